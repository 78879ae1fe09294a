//! The order of one epoch for one rank: PyTorch `DistributedSampler`'s
//! contract, with convflow's shuffle (the `file_reader` draw: ChaCha8 seeded
//! from `seed`, stream `epoch`), so the order is a function of (seed, epoch)
//! alone and `world_size=1` gives `file_reader`'s own shuffled order.

use rand::SeedableRng;
use rand::seq::SliceRandom;

/// How many items each rank gets: the tail is dropped so every rank gets
/// `n / world` (`drop_last`), or the list is padded with its own first
/// items up to `ceil(n / world)` per rank.
pub fn per_rank(n: usize, world: usize, drop_last: bool) -> usize {
    if drop_last { n / world } else { n.div_ceil(world) }
}

/// Indices into `0..n` that rank `rank` of `world` reads in `epoch`.
pub fn epoch_order(
    n: usize,
    seed: u64,
    epoch: u32,
    shuffle: bool,
    rank: usize,
    world: usize,
    drop_last: bool,
) -> Vec<usize> {
    let mut order: Vec<usize> = (0..n).collect();
    if shuffle {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(epoch as u64);
        order.shuffle(&mut rng);
    }
    let total = per_rank(n, world, drop_last) * world;
    if total > n && n > 0 {
        // DistributedSampler's padding: the order's own first items, repeated as needed.
        let pad: Vec<usize> = order.iter().copied().cycle().take(total - n).collect();
        order.extend(pad);
    }
    order.truncate(total);
    order.into_iter().skip(rank).step_by(world).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranks_are_disjoint_equal_and_cover() {
        for (n, world, drop_last) in [(10, 3, false), (10, 3, true), (9, 3, true), (2, 3, false)] {
            let shares: Vec<Vec<usize>> = (0..world).map(|r| epoch_order(n, 7, 2, true, r, world, drop_last)).collect();
            let len = per_rank(n, world, drop_last);
            assert!(shares.iter().all(|s| s.len() == len));
            let mut all: Vec<usize> = shares.concat();
            all.sort();
            if drop_last {
                all.dedup();
                assert_eq!(all.len(), len * world);
            } else {
                all.dedup();
                assert_eq!(all, (0..n).collect::<Vec<_>>());
            }
        }
    }
}
