//! What ONNX Runtime's CUDA provider needs on this machine, found without a
//! hand-set `LD_LIBRARY_PATH`, and what is missing, named.
//!
//! The provider is `libonnxruntime_providers_cuda.so` beside the ONNX
//! Runtime library (the `onnxruntime-gpu` wheel has it; the CPU wheel does
//! not). It links the CUDA runtime, cuBLAS, cuFFT, cuRAND and cuDNN, which
//! the common layouts keep in folders the loader does not search: the
//! `nvidia-*` Python packages (`site-packages/nvidia/*/lib`), `CUDA_HOME`.
//! Those are loaded here first, globally, so the provider's own loading finds
//! them; then the provider is opened once to learn, from the loader itself,
//! the first library still missing.

use std::ffi::{CStr, CString};
use std::path::{Path, PathBuf};

pub const PROVIDER_LIBRARY: &str = "libonnxruntime_providers_cuda.so";

/// Folders searched for the CUDA libraries, in order: `CONVFLOW_CUDA_LIB_DIRS`
/// (colon-separated), the `nvidia/*/lib` folders of the site-packages that
/// holds the ONNX Runtime library (the wheel layout) and of the project's
/// `.venv`, `CUDA_HOME` / `CUDA_PATH` `lib64`, `/usr/local/cuda/lib64`.
pub fn library_dirs(ort_library: &Path) -> Vec<PathBuf> {
    let mut dirs: Vec<PathBuf> = Vec::new();
    if let Some(v) = std::env::var_os("CONVFLOW_CUDA_LIB_DIRS") {
        dirs.extend(std::env::split_paths(&v));
    }
    let mut site_packages: Vec<PathBuf> = ort_library
        .ancestors()
        .filter(|a| a.file_name().is_some_and(|n| n == "site-packages"))
        .map(Path::to_path_buf)
        .collect();
    if let Ok(entries) = std::fs::read_dir(".venv/lib") {
        site_packages.extend(entries.flatten().map(|e| e.path().join("site-packages")));
    }
    for sp in site_packages {
        if let Ok(entries) = std::fs::read_dir(sp.join("nvidia")) {
            let mut libs: Vec<PathBuf> =
                entries.flatten().map(|e| e.path().join("lib")).filter(|p| p.is_dir()).collect();
            libs.sort();
            dirs.extend(libs);
        }
    }
    for var in ["CUDA_HOME", "CUDA_PATH"] {
        if let Some(v) = std::env::var_os(var) {
            dirs.push(PathBuf::from(v).join("lib64"));
        }
    }
    dirs.push(PathBuf::from("/usr/local/cuda/lib64"));
    dirs.retain(|d| d.is_dir());
    dirs.dedup();
    dirs
}

/// Opens a shared library globally; the loader's message on failure.
fn dlopen(path: &Path) -> Result<(), String> {
    let c = CString::new(path.as_os_str().as_encoded_bytes()).map_err(|e| e.to_string())?;
    // SAFETY: a NUL-terminated path; the handle is kept open for the process's
    // life on purpose (the provider needs the libraries it resolves against).
    let handle = unsafe { libc::dlopen(c.as_ptr(), libc::RTLD_NOW | libc::RTLD_GLOBAL) };
    if !handle.is_null() {
        return Ok(());
    }
    // SAFETY: dlerror returns a thread-local C string or null.
    let err = unsafe { libc::dlerror() };
    Err(if err.is_null() {
        "unknown error".into()
    } else {
        unsafe { CStr::from_ptr(err) }.to_string_lossy().into_owned()
    })
}

/// Whether this machine has an NVIDIA driver at all: its kernel module
/// (`/proc/driver/nvidia`, visible in containers given a GPU too) or its
/// user-space library `libcuda.so.1`. Without one, `device: auto` running on
/// the CPU is the expected path, not a problem to warn about.
pub fn nvidia_driver_present() -> bool {
    Path::new("/proc/driver/nvidia").exists() || dlopen(Path::new("libcuda.so.1")).is_ok()
}

/// Makes the CUDA provider loadable, or says what stops it: no provider
/// library beside `ort_library`, no NVIDIA driver, or the first CUDA / cuDNN
/// library the loader cannot find, with the folders searched.
pub fn prepare(ort_library: &Path) -> Result<(), String> {
    let provider = ort_library.with_file_name(PROVIDER_LIBRARY);
    if !provider.exists() {
        return Err(format!(
            "this ONNX Runtime build has no CUDA execution provider ({PROVIDER_LIBRARY} is not beside {}; \
             install onnxruntime-gpu: CONVFLOW_ORT=gpu models/setup.sh, or point ORT_DYLIB_PATH at a GPU build)",
            ort_library.display()
        ));
    }
    if let Err(e) = dlopen(Path::new("libcuda.so.1")) {
        return Err(format!("no NVIDIA driver: libcuda.so.1 cannot be loaded ({e})"));
    }
    let dirs = library_dirs(ort_library);
    // Load every versioned CUDA library found; ones that need another not yet
    // loaded are retried after it (cuBLAS needs cuBLASLt, cuDNN's parts need cuDNN).
    let mut pending: Vec<PathBuf> = dirs
        .iter()
        .flat_map(|d| std::fs::read_dir(d).into_iter().flatten().flatten().map(|e| e.path()))
        .filter(|p| p.file_name().and_then(|n| n.to_str()).is_some_and(|n| n.starts_with("lib") && n.contains(".so.")))
        .collect();
    pending.sort();
    for _ in 0..8 {
        let before = pending.len();
        pending.retain(|p| dlopen(p).is_err());
        if pending.len() == before {
            break;
        }
    }
    // The provider itself must not be opened here: its globals take ONNX
    // Runtime's host pointer when it loads, which ORT sets just before it
    // opens the provider; opened earlier they keep a null one and the first
    // session crashes (seen on an H200). Its own dependencies are opened by
    // name instead, so the loader names the first one it cannot find.
    let needed = needed_libraries(&provider)
        .map_err(|e| format!("cannot read the CUDA provider {}: {e}", provider.display()))?;
    needed.iter().filter(|n| !n.starts_with("libonnxruntime")).try_for_each(|n| dlopen(Path::new(n))).map_err(|e| {
        let searched = if dirs.is_empty() {
            "no CUDA library folder found".to_string()
        } else {
            dirs.iter().map(|d| d.display().to_string()).collect::<Vec<_>>().join(", ")
        };
        format!(
            "the CUDA provider cannot be loaded: {e} (CUDA 13 and cuDNN 9 are needed; searched: {searched}; \
             add folders with CONVFLOW_CUDA_LIB_DIRS)"
        )
    })
}

/// The `DT_NEEDED` names of a 64-bit little-endian ELF shared library: what
/// the loader will look for when it is opened, read without opening it.
fn needed_libraries(path: &Path) -> Result<Vec<String>, String> {
    use std::os::unix::fs::FileExt;
    let file = std::fs::File::open(path).map_err(|e| e.to_string())?;
    let read = |offset: u64, len: usize| -> Result<Vec<u8>, String> {
        let mut buf = vec![0u8; len];
        file.read_exact_at(&mut buf, offset).map_err(|e| format!("{e} at byte {offset}"))?;
        Ok(buf)
    };
    let u16_at = |b: &[u8], i: usize| u16::from_le_bytes([b[i], b[i + 1]]);
    let u64_at = |b: &[u8], i: usize| u64::from_le_bytes(b[i..i + 8].try_into().unwrap_or([0; 8]));
    let header = read(0, 64)?;
    if &header[..4] != b"\x7fELF" || header[4] != 2 || header[5] != 1 {
        return Err("not a 64-bit little-endian ELF file".into());
    }
    let (phoff, phentsize, phnum) = (u64_at(&header, 0x20), u16_at(&header, 0x36) as u64, u16_at(&header, 0x38));
    // (type, offset, vaddr, filesz) of each program header.
    let segments: Vec<(u32, u64, u64, u64)> = (0..phnum as u64)
        .map(|i| {
            let ph = read(phoff + i * phentsize, 56)?;
            let kind = u32::from_le_bytes([ph[0], ph[1], ph[2], ph[3]]);
            Ok((kind, u64_at(&ph, 8), u64_at(&ph, 16), u64_at(&ph, 32)))
        })
        .collect::<Result<_, String>>()?;
    const PT_LOAD: u32 = 1;
    const PT_DYNAMIC: u32 = 2;
    let Some(&(_, dyn_off, _, dyn_size)) = segments.iter().find(|s| s.0 == PT_DYNAMIC) else {
        return Ok(Vec::new()); // statically linked: needs nothing
    };
    let dynamic = read(dyn_off, dyn_size as usize)?;
    let (mut names, mut strtab, mut strsz) = (Vec::new(), 0u64, 0u64);
    for entry in dynamic.chunks_exact(16) {
        match u64_at(entry, 0) {
            0 => break,
            1 => names.push(u64_at(entry, 8)),
            5 => strtab = u64_at(entry, 8),
            10 => strsz = u64_at(entry, 8),
            _ => {}
        }
    }
    // DT_STRTAB is an address: find the loaded segment that holds it.
    let strtab_off = segments
        .iter()
        .find(|&&(kind, _, vaddr, filesz)| kind == PT_LOAD && (vaddr..vaddr + filesz).contains(&strtab))
        .map(|&(_, offset, vaddr, _)| strtab - vaddr + offset)
        .ok_or("its string table lies in no loaded segment")?;
    let strings = read(strtab_off, strsz as usize)?;
    names
        .into_iter()
        .map(|i| {
            let tail = strings.get(i as usize..).ok_or("a library name lies outside the string table")?;
            let end = tail.iter().position(|&b| b == 0).unwrap_or(tail.len());
            Ok(String::from_utf8_lossy(&tail[..end]).into_owned())
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_cpu_build_is_named_as_having_no_cuda_provider() {
        let tmp = std::env::temp_dir().join("convflow-cuda-test");
        std::fs::create_dir_all(&tmp).unwrap();
        let err = prepare(&tmp.join("libonnxruntime.so.1.31.1")).unwrap_err();
        assert!(err.contains("no CUDA execution provider") && err.contains(PROVIDER_LIBRARY), "{err}");
    }

    #[test]
    fn the_libraries_an_executable_needs_are_read_from_its_elf_header() {
        let needed = needed_libraries(&std::env::current_exe().unwrap()).unwrap();
        assert!(needed.iter().any(|n| n.starts_with("libc.so")), "{needed:?}");
        let err = needed_libraries(Path::new("Cargo.toml")).unwrap_err();
        assert!(err.contains("not a 64-bit little-endian ELF"), "{err}");
    }

    #[test]
    fn the_wheel_layout_and_the_override_are_searched() {
        let tmp = std::env::temp_dir().join(format!("convflow-cuda-dirs-{}", std::process::id()));
        let sp = tmp.join("lib/python3.12/site-packages");
        for p in ["nvidia/cudnn/lib", "nvidia/cublas/lib", "onnxruntime/capi"] {
            std::fs::create_dir_all(sp.join(p)).unwrap();
        }
        let dirs = library_dirs(&sp.join("onnxruntime/capi/libonnxruntime.so.1.31.1"));
        assert!(
            dirs.contains(&sp.join("nvidia/cudnn/lib")) && dirs.contains(&sp.join("nvidia/cublas/lib")),
            "{dirs:?}"
        );
        std::fs::remove_dir_all(&tmp).unwrap();
    }
}
