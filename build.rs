//! Compiles the small C shim through which the decode stage's `min_size`
//! reaches libjpeg-turbo's DCT-domain scaling, and links the system's
//! libjpeg-turbo (Debian: libjpeg62-turbo-dev, which `models/setup.sh`
//! installs when it is missing).

fn main() {
    let shim = "src/imaging/decode/libjpeg_shim.c";
    println!("cargo:rerun-if-changed={shim}");
    if !["/usr/include/jpeglib.h", "/usr/local/include/jpeglib.h"].iter().any(|p| std::path::Path::new(p).exists()) {
        println!(
            "cargo:warning=jpeglib.h not found: install libjpeg-turbo's development files \
             (Debian/Ubuntu: apt-get install libjpeg62-turbo-dev; models/setup.sh does it)"
        );
    }
    cc::Build::new().file(shim).opt_level(2).warnings(true).compile("convflow_libjpeg_shim");
    println!("cargo:rustc-link-lib=jpeg");
}
