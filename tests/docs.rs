//! The docs cannot drift from the code: the stage reference is the one
//! `convflow stages --markdown` prints, every pipeline file in the repo and
//! every complete pipeline in the docs passes `convflow validate`, and every
//! relative link in the docs points at a file that exists.

mod common;

use std::path::{Path, PathBuf};

fn markdown_pages() -> Vec<PathBuf> {
    let root = common::root();
    let mut pages = vec![root.join("README.md")];
    let mut docs: Vec<PathBuf> = std::fs::read_dir(root.join("docs"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    docs.sort();
    pages.extend(docs);
    pages
}

/// Runs `convflow validate` on `file`; the params a pipeline reads its
/// inputs from point at real ones (validation checks that they exist): the
/// demo data set, and for a pipeline that uses a trained head or convnet,
/// one trained here on it.
fn validate(file: &Path, inputs: &Inputs) -> (bool, String) {
    let text = std::fs::read_to_string(file).unwrap();
    let mut cmd = common::bin();
    cmd.arg("validate").arg(file);
    // A fine-tuned VGG16 costs minutes to make: the file alone is checked
    // here; tests/fine_tune.rs validates and runs it against a real one.
    if file.ends_with("predict_fine_tuned.yaml") {
        cmd.arg("--no-environment");
    }
    if text.contains("${data_dir}") {
        cmd.arg("--set").arg(format!("data_dir={}", inputs.demo.display()));
    }
    if text.contains("${input_dir}") {
        cmd.arg("--set").arg(format!("input_dir={}", inputs.demo.join("test").display()));
    }
    if text.contains("${head}") {
        // What the head was trained on (its facts are checked against the edge's).
        cmd.arg("--set").arg(format!("head={}", inputs.head().display()));
        if text.contains("${base}") {
            cmd.arg("--set").arg(format!("base={}", common::tiny_model().display()));
        }
        if text.contains("${image_size}") {
            cmd.args(["--set", "image_size=64"]);
        }
    }
    if text.contains("${convnet}") {
        cmd.arg("--set").arg(format!("convnet={}", inputs.convnet().display()));
    }
    let out = cmd.output().unwrap();
    (out.status.success(), format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
}

struct Inputs {
    dir: PathBuf,
    demo: PathBuf,
    head: std::cell::OnceCell<PathBuf>,
    convnet: std::cell::OnceCell<PathBuf>,
}

impl Inputs {
    fn new(dir: &Path) -> Inputs {
        let demo = dir.join("demo");
        convflow::demo::generate(&demo, 42).unwrap();
        Inputs { dir: dir.to_path_buf(), demo, head: std::cell::OnceCell::new(), convnet: std::cell::OnceCell::new() }
    }

    /// A head trained on the demo data through the tiny model's caffe
    /// features of 64x64 images (the maps the fine-tuning and Grad-CAM
    /// pipelines make are caffe), one epoch.
    fn head(&self) -> &Path {
        self.head.get_or_init(|| {
            let out = self.dir.join("head");
            let o = common::bin()
                .args(["--quiet", "run", "pipelines/feature_extraction.yaml", "--set"])
                .arg(format!("data_dir={}", self.demo.display()))
                .arg("--set")
                .arg(format!("out_dir={}", out.display()))
                .arg("--set")
                .arg(format!("cache_dir={}", self.dir.join("cache").display()))
                .arg("--set")
                .arg(format!("base={}", common::tiny_model().display()))
                .args(["--set", "image_size=64", "--set", "epochs=1", "--set", "preprocess=caffe"])
                .current_dir(common::root())
                .output()
                .unwrap();
            assert!(o.status.success(), "training a head: {}", String::from_utf8_lossy(&o.stderr));
            out
        })
    }

    /// A tiny convnet trained on the demo data, one epoch, at the 150x150
    /// input that predict_convnet.yaml resizes to by default.
    fn convnet(&self) -> &Path {
        self.convnet.get_or_init(|| {
            let out = self.dir.join("convnet");
            let yaml = format!(
                "stages:
  - {{id: files, kind: file_reader, dir: {demo}, splits: [train, validation], class_mode: binary}}
  - {{id: decode, kind: decode, input: files}}
  - {{id: resize, kind: resize, input: decode, size: [150, 150]}}
  - id: net
    kind: convnet
    input: resize
    out_dir: {out}
    rescale: 0.00392156862745098
    epochs: 1
    layers:
      - {{kind: conv2d, filters: 2, kernel_size: 3, strides: 3, activation: relu}}
      - {{kind: max_pooling2d, pool_size: 5}}
      - {{kind: flatten}}
      - {{kind: dense, units: 1, activation: sigmoid}}
",
                demo = self.demo.display(),
                out = out.display()
            );
            let pipeline = common::write_pipeline(&self.dir, "train_convnet.yaml", &yaml);
            let o = common::bin().args(["--quiet", "run"]).arg(&pipeline).output().unwrap();
            assert!(o.status.success(), "training a convnet: {}", String::from_utf8_lossy(&o.stderr));
            out
        })
    }
}

#[test]
fn stage_reference_page_is_what_the_registry_prints() {
    let out = common::bin().args(["stages", "--markdown"]).output().unwrap();
    assert!(out.status.success());
    let printed = String::from_utf8(out.stdout).unwrap();
    let page = std::fs::read_to_string(common::root().join("docs/stages.md")).unwrap();
    assert!(
        page == printed,
        "docs/stages.md is out of date: regenerate it with `convflow stages --markdown > docs/stages.md`"
    );
    // Every built-in kind has its section.
    let kinds = convflow::stages::builtin_registry();
    for info in kinds.kinds() {
        assert!(page.contains(&format!("## `{}`", info.kind)), "no section for {}", info.kind);
    }
}

#[test]
fn every_pipeline_file_validates_and_opens_with_what_it_does() {
    let tmp = tempfile::tempdir().unwrap();
    let inputs = Inputs::new(tmp.path());
    let mut files: Vec<PathBuf> = std::fs::read_dir(common::root().join("pipelines"))
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "yaml"))
        .collect();
    files.sort();
    assert!(files.len() >= 4, "pipelines/ has only {} files", files.len());
    let mut failed = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(f).unwrap();
        assert!(text.starts_with("# "), "{} does not open with a comment saying what it does", f.display());
        let (ok, msg) = validate(f, &inputs);
        if !ok {
            failed.push(format!("{}:\n{msg}", f.display()));
        }
    }
    assert!(failed.is_empty(), "pipelines that do not validate:\n{}", failed.join("\n"));
}

#[test]
fn every_complete_pipeline_in_the_docs_validates() {
    let tmp = tempfile::tempdir().unwrap();
    let inputs = Inputs::new(tmp.path());
    let mut checked = 0;
    let mut failed = Vec::new();
    for page in markdown_pages() {
        let text = std::fs::read_to_string(&page).unwrap();
        for (n, block) in text.split("```yaml\n").skip(1).enumerate() {
            let block = block.split("```").next().unwrap();
            // A fragment (a stage list, a metrics: section) is not a pipeline.
            if !block.lines().any(|l| l.starts_with("stages:")) {
                continue;
            }
            let name = page.file_stem().unwrap().to_string_lossy().to_string();
            let file = tmp.path().join(format!("{name}-{n}.yaml"));
            std::fs::write(&file, block).unwrap();
            // Relative paths in the docs are relative to the checkout.
            let (ok, msg) = validate(&file, &inputs);
            if !ok {
                failed.push(format!("{} (yaml block {n}):\n{msg}", page.display()));
            }
            checked += 1;
        }
    }
    assert!(checked >= 1, "no complete pipeline found in the docs");
    assert!(failed.is_empty(), "{}", failed.join("\n"));
}

#[test]
fn relative_links_in_the_docs_point_at_files_that_exist() {
    let mut broken = Vec::new();
    for page in markdown_pages() {
        let text = std::fs::read_to_string(&page).unwrap();
        let dir = page.parent().unwrap();
        for part in text.split("](").skip(1) {
            let target = part.split(')').next().unwrap();
            if target.contains("://") || target.starts_with('#') || target.contains(' ') {
                continue;
            }
            let path = target.split('#').next().unwrap();
            if !dir.join(path).exists() {
                broken.push(format!("{}: {target}", page.display()));
            }
        }
    }
    assert!(broken.is_empty(), "broken links:\n{}", broken.join("\n"));
}
