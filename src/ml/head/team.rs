//! Worker threads that live as long as their head, for the hot loops' fork
//! and join. A training step has two parallel phases (the first layer's
//! forward and its kernel update), a few hundred microseconds each; starting
//! threads for each costs 20-40 us on a quiet machine and 150 us or more when
//! the cores are busy, and the core a joining thread gives up meanwhile goes
//! to another process that evicts its caches. So workers spin for a short
//! while after a phase, waiting for the next one, and only then park.

use std::panic::{AssertUnwindSafe, catch_unwind, resume_unwind};
use std::sync::atomic::{AtomicBool, AtomicPtr, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::{JoinHandle, Thread};
use std::time::{Duration, Instant};

/// How long an idle worker (or the waiting caller) spins before it parks:
/// longer than the gap between two phases of a step, short enough that a
/// head left idle hands its cores back at once.
const SPIN: Duration = Duration::from_micros(200);

/// A thread count and, made on first use, the workers that go with it.
pub(super) struct Team {
    threads: usize,
    pool: OnceLock<Pool>,
}

impl Team {
    pub(super) fn new(threads: usize) -> Team {
        Team { threads: threads.max(1), pool: OnceLock::new() }
    }

    pub(super) fn threads(&self) -> usize {
        self.threads
    }

    /// Calls `f` once for each part, part `i` on thread `i` (the caller takes
    /// part 0), and returns when all are done. At most [`Team::threads`] parts.
    pub(super) fn run<T: Send>(&self, parts: Vec<T>, f: impl Fn(T) + Sync) {
        assert!(parts.len() <= self.threads, "more parts than threads");
        if parts.len() <= 1 {
            parts.into_iter().for_each(f);
            return;
        }
        let slots: Vec<Mutex<Option<T>>> = parts.into_iter().map(|p| Mutex::new(Some(p))).collect();
        let job = |i: usize| {
            let part = slots.get(i).and_then(|s| s.lock().ok()?.take());
            if let Some(part) = part {
                f(part);
            }
        };
        self.pool.get_or_init(|| Pool::start(self.threads - 1)).run(slots.len(), &job);
    }
}

impl Clone for Team {
    /// A clone gets its own workers, started when it first needs them.
    fn clone(&self) -> Team {
        Team::new(self.threads)
    }
}

impl std::fmt::Debug for Team {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Team").field("threads", &self.threads).finish()
    }
}

/// The job of one phase, on the caller's stack until every worker is done with it.
struct Job {
    f: *const (dyn Fn(usize) + Sync),
    /// Workers that take part: those numbered below it (worker `w` runs part `w + 1`).
    workers: usize,
}

struct Shared {
    /// Bumped for each phase (and at shutdown); workers wait for it to change.
    generation: AtomicU64,
    job: AtomicPtr<Job>,
    /// Workers still running the current job.
    pending: AtomicUsize,
    panicked: AtomicBool,
    stop: AtomicBool,
    /// The thread waiting in [`Pool::run`], woken by the last worker.
    caller: Mutex<Option<Thread>>,
}

struct Pool {
    shared: Arc<Shared>,
    workers: Vec<JoinHandle<()>>,
    /// One phase at a time.
    dispatch: Mutex<()>,
}

impl Pool {
    fn start(workers: usize) -> Pool {
        let shared = Arc::new(Shared {
            generation: AtomicU64::new(0),
            job: AtomicPtr::new(std::ptr::null_mut()),
            pending: AtomicUsize::new(0),
            panicked: AtomicBool::new(false),
            stop: AtomicBool::new(false),
            caller: Mutex::new(None),
        });
        // A worker that cannot be started leaves its parts to the caller.
        let workers = (0..workers)
            .map_while(|w| {
                let shared = Arc::clone(&shared);
                std::thread::Builder::new().name(format!("head-worker-{}", w + 1)).spawn(move || work(&shared, w)).ok()
            })
            .collect();
        Pool { shared, workers, dispatch: Mutex::new(()) }
    }

    /// Runs `f(0)` here and `f(1..parts)` on the workers (here too, those
    /// beyond the workers there are).
    fn run(&self, parts: usize, f: &(dyn Fn(usize) + Sync)) {
        let _one_at_a_time = self.dispatch.lock().unwrap_or_else(|e| e.into_inner());
        let s = &*self.shared;
        let workers = (parts - 1).min(self.workers.len());
        // SAFETY (of the workers' use of `job`): this function does not return
        // before `pending` is back to 0, that is before every worker is done
        // with `f`, so erasing its lifetime here never lets it dangle.
        let erased: *const (dyn Fn(usize) + Sync + '_) = f;
        let erased: *const (dyn Fn(usize) + Sync) = unsafe { std::mem::transmute(erased) };
        let job = Job { f: erased, workers };
        *s.caller.lock().unwrap_or_else(|e| e.into_inner()) = Some(std::thread::current());
        s.pending.store(self.workers.len(), Ordering::Relaxed);
        s.job.store((&raw const job).cast_mut(), Ordering::Relaxed);
        s.generation.fetch_add(1, Ordering::Release);
        for w in &self.workers {
            w.thread().unpark();
        }
        let mine = catch_unwind(AssertUnwindSafe(|| std::iter::once(0).chain(workers + 1..parts).for_each(f)));
        let start = Instant::now();
        while s.pending.load(Ordering::Acquire) != 0 {
            if start.elapsed() < SPIN {
                std::hint::spin_loop();
            } else {
                std::thread::park();
            }
        }
        s.job.store(std::ptr::null_mut(), Ordering::Relaxed);
        if let Err(e) = mine {
            resume_unwind(e);
        }
        if s.panicked.swap(false, Ordering::Relaxed) {
            panic!("a head worker thread panicked");
        }
    }
}

impl Drop for Pool {
    fn drop(&mut self) {
        self.shared.stop.store(true, Ordering::Relaxed);
        self.shared.generation.fetch_add(1, Ordering::Release);
        for w in self.workers.drain(..) {
            w.thread().unpark();
            // A worker catches its job's panics, so it only ends by returning.
            let _ = w.join();
        }
    }
}

/// Worker `w`'s loop: wait for a phase, run part `w + 1` if it has one, report.
fn work(s: &Shared, w: usize) {
    let mut seen = 0;
    loop {
        let start = Instant::now();
        let generation = loop {
            let g = s.generation.load(Ordering::Acquire);
            if g != seen {
                break g;
            }
            if start.elapsed() < SPIN {
                std::hint::spin_loop();
            } else {
                std::thread::park();
            }
        };
        seen = generation;
        if s.stop.load(Ordering::Relaxed) {
            return;
        }
        let job = s.job.load(Ordering::Relaxed);
        // SAFETY: `Pool::run` published `job` before bumping the generation
        // (release; acquired above) and keeps it alive until `pending` is 0.
        let job = unsafe { &*job };
        if w < job.workers {
            // SAFETY: as above, `f` outlives this call.
            let f = unsafe { &*job.f };
            if catch_unwind(AssertUnwindSafe(|| f(w + 1))).is_err() {
                s.panicked.store(true, Ordering::Relaxed);
            }
        }
        if s.pending.fetch_sub(1, Ordering::AcqRel) == 1 {
            let caller = s.caller.lock().unwrap_or_else(|e| e.into_inner()).clone();
            if let Some(t) = caller {
                t.unpark();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_part_runs_once_on_its_own_thread_phase_after_phase() {
        let team = Team::new(3);
        for phase in 0..50 {
            let ids = Mutex::new(Vec::new());
            let parts: Vec<usize> = (0..1 + phase % 3).collect();
            team.run(parts.clone(), |i| ids.lock().unwrap().push((i, std::thread::current().id())));
            let mut ids = ids.into_inner().unwrap();
            ids.sort_by_key(|&(i, _)| i);
            assert_eq!(ids.iter().map(|&(i, _)| i).collect::<Vec<_>>(), parts);
            assert_eq!(ids[0].1, std::thread::current().id(), "part 0 runs on the caller");
            for (a, b) in ids.iter().zip(ids.iter().skip(1)) {
                assert_ne!(a.1, b.1);
            }
        }
        // Past the spin: the workers have parked and must wake up.
        std::thread::sleep(SPIN * 5);
        let sum = AtomicUsize::new(0);
        team.run(vec![1, 2, 3], |i| {
            sum.fetch_add(i, Ordering::Relaxed);
        });
        assert_eq!(sum.into_inner(), 6);
    }

    #[test]
    fn a_panic_in_a_worker_reaches_the_caller_and_the_team_goes_on() {
        let team = Team::new(2);
        let caught = catch_unwind(AssertUnwindSafe(|| team.run(vec![0, 1], |i| assert!(i == 0, "part {i}"))));
        assert!(caught.is_err());
        let done = AtomicUsize::new(0);
        team.run(vec![0, 1], |_| {
            done.fetch_add(1, Ordering::Relaxed);
        });
        assert_eq!(done.into_inner(), 2);
    }
}
