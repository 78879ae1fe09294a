//! Image codecs shared by the stages, the CLI, `visualize` and the benches:
//! no pipeline in sight.

pub mod decode;
pub mod resize;
