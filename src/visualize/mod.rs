//! Seeing what a convnet learned (the book's section 5.4), as pictures:
//!
//! - [`activations`]: every channel of every layer's output for one image.
//! - [`filters`]: the input pattern each filter of a VGG16 layer responds
//!   to most, by gradient ascent in input space.
//! - [`heatmap`]: Grad-CAM, where in a photo a classifier saw its class
//!   (5.4.3), and the heatmap drawn over the photo as the book does.
//! - [`picture`]: tile grids, titles and colour maps they share.
//!
//! The models are [`crate::ml::convnet::Convnet`]s (VGG16's conv base with
//! its ImageNet weights, or a trained `convnet`), whose gradients w.r.t.
//! any layer's input these need.

pub mod activations;
pub mod filters;
pub mod heatmap;
pub mod picture;
