//! The 2-D affine map from output pixels to source coordinates, built the
//! way Keras builds it, so the same parameters move pixels the same way.
//!
//! Keras (`apply_affine_transform`) works on `(row, col)` index coordinates,
//! the order scipy's `affine_transform` uses, and the matrix maps *output*
//! coordinates to *input* ones (pull resampling). It multiplies rotation,
//! then shift, then shear, then zoom, and centres the product with
//! `transform_matrix_offset_center`, whose centre is `(h/2 + 0.5, w/2 + 0.5)`
//! (half a pixel past the true centre; kept, since it is what Keras does).
//! Consequences of its naming, also kept: `tx` moves along rows (the height
//! shift), `ty` along columns, and `zx` scales rows, `zy` columns.

use super::Transform;

/// `[[a, b, c], [d, e, f]]`: `(r, c) -> (a r + b c + c0, d r + e c + f)`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Affine {
    pub m: [[f64; 3]; 2],
}

impl Affine {
    pub const IDENTITY: Affine = Affine { m: [[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]] };

    pub fn new(linear: [[f64; 2]; 2], offset: [f64; 2]) -> Self {
        Affine { m: [[linear[0][0], linear[0][1], offset[0]], [linear[1][0], linear[1][1], offset[1]]] }
    }

    pub fn translation(dr: f64, dc: f64) -> Self {
        Affine::new([[1.0, 0.0], [0.0, 1.0]], [dr, dc])
    }

    pub fn scale(sr: f64, sc: f64) -> Self {
        Affine::new([[sr, 0.0], [0.0, sc]], [0.0, 0.0])
    }

    /// `self * other`: apply `other` first, then `self`.
    pub fn mul(&self, other: &Affine) -> Affine {
        let (a, b) = (&self.m, &other.m);
        let mut m = [[0.0; 3]; 2];
        for i in 0..2 {
            for j in 0..3 {
                m[i][j] = a[i][0] * b[0][j] + a[i][1] * b[1][j];
            }
            m[i][2] += a[i][2];
        }
        Affine { m }
    }

    pub fn apply(&self, r: f64, c: f64) -> (f64, f64) {
        let m = &self.m;
        (m[0][0] * r + m[0][1] * c + m[0][2], m[1][0] * r + m[1][1] * c + m[1][2])
    }

    pub fn is_identity(&self) -> bool {
        *self == Affine::IDENTITY
    }
}

/// Keras's `apply_affine_transform` matrix for an `h x w` image; `None`
/// when every parameter is neutral (Keras then leaves the image as it is).
/// Angles in degrees, shifts in pixels; the flips are not part of it.
pub fn keras_matrix(t: &Transform, h: u32, w: u32) -> Option<Affine> {
    let Transform { theta, tx, ty, shear, zx, zy, .. } = *t;
    let mut m: Option<Affine> = None;
    let mut then = |next: Affine| m = Some(m.map_or(next, |prev| prev.mul(&next)));
    if theta != 0.0 {
        let (s, c) = theta.to_radians().sin_cos();
        then(Affine::new([[c, -s], [s, c]], [0.0, 0.0]));
    }
    if tx != 0.0 || ty != 0.0 {
        then(Affine::translation(tx, ty));
    }
    if shear != 0.0 {
        let (s, c) = shear.to_radians().sin_cos();
        then(Affine::new([[1.0, -s], [0.0, c]], [0.0, 0.0]));
    }
    if zx != 1.0 || zy != 1.0 {
        then(Affine::scale(zx, zy));
    }
    let (or, oc) = (f64::from(h) / 2.0 + 0.5, f64::from(w) / 2.0 + 0.5);
    m.map(|m| Affine::translation(or, oc).mul(&m).mul(&Affine::translation(-or, -oc)))
}

/// The map that mirrors output pixels (Keras flips after the warp; folding
/// the flip into the map reads the same pixels in one pass).
pub fn flips(horizontal: bool, vertical: bool, h: u32, w: u32) -> Affine {
    let (sr, dr) = if vertical { (-1.0, f64::from(h) - 1.0) } else { (1.0, 0.0) };
    let (sc, dc) = if horizontal { (-1.0, f64::from(w) - 1.0) } else { (1.0, 0.0) };
    Affine::new([[sr, 0.0], [0.0, sc]], [dr, dc])
}

/// From a virtual `vh x vw` grid (the image as if resized first) to the
/// source's `sh x sw` pixels: pixel centres line up, as in an area resize.
pub fn grid_to_source(vh: u32, vw: u32, sh: u32, sw: u32) -> Affine {
    let sr = f64::from(sh) / f64::from(vh);
    let sc = f64::from(sw) / f64::from(vw);
    Affine::new([[sr, 0.0], [0.0, sc]], [0.5 * sr - 0.5, 0.5 * sc - 0.5])
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matrix(theta: f64, tx: f64, ty: f64, zx: f64) -> Option<Affine> {
        keras_matrix(&Transform { theta, tx, ty, zx, ..Transform::default() }, 10, 20)
    }

    #[test]
    fn neutral_parameters_give_no_matrix() {
        assert!(matrix(0.0, 0.0, 0.0, 1.0).is_none());
    }

    #[test]
    fn the_centre_is_kerass_half_pixel_past_the_middle() {
        // A rotation by 180 degrees maps the centre to itself.
        let m = matrix(180.0, 0.0, 0.0, 1.0).unwrap();
        let (r, c) = m.apply(5.5, 10.5);
        assert!((r - 5.5).abs() < 1e-12 && (c - 10.5).abs() < 1e-12);
    }

    #[test]
    fn tx_moves_rows_and_zx_scales_rows() {
        let m = matrix(0.0, 3.0, 0.0, 1.0).unwrap();
        assert_eq!(m.apply(0.0, 0.0), (3.0, 0.0));
        let m = matrix(0.0, 0.0, 0.0, 2.0).unwrap();
        let (r, c) = m.apply(5.5 + 1.0, 10.5);
        assert!((r - 7.5).abs() < 1e-12 && (c - 10.5).abs() < 1e-12);
    }

    #[test]
    fn flips_mirror_the_output_grid() {
        let f = flips(true, true, 10, 20);
        assert_eq!(f.apply(0.0, 0.0), (9.0, 19.0));
        assert_eq!(flips(false, false, 10, 20), Affine::IDENTITY);
    }
}
