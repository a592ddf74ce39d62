//! What the end-to-end tests of the `mimlab` binary share: running it, the bundled-data check
//! and the tiny model and data their runs use.
#![allow(dead_code)] // each test binary uses its own part

use std::path::Path;
use std::process::{Command, Output};

/// Runs the binary from the checkout.
pub fn mimlab(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mimlab"))
        .args(args)
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .expect("mimlab binary runs")
}

/// Runs the binary, asserts success (showing its output otherwise); returns its stdout.
pub fn ok(args: &[&str]) -> String {
    let out = mimlab(args);
    assert!(
        out.status.success(),
        "mimlab {args:?} failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// Fails with the command to run when the bundled data is missing.
pub fn require_data() {
    let p =
        Path::new(env!("CARGO_MANIFEST_DIR")).join("data/fashion-mnist/train-images-idx3-ubyte.gz");
    assert!(
        p.exists(),
        "{} is missing: run `bash scripts/setup-data.sh` first",
        p.display()
    );
}

/// `--set` overrides of a tiny run: a 2-stage 16-wide Swin-V2 at 32 px, 128 images, batch 16.
pub const TINY: [&str; 10] = [
    "model.img_size=32",
    "model.embed_dim=16",
    "model.depths=[1,1]",
    "model.num_heads=[1,2]",
    "model.pretrained_window_sizes=[0,0]",
    "data.max_samples=128",
    "data.num_workers=0",
    "train.batch_size=16",
    "train.warmup_epochs=0.5",
    "run.log_every=1",
];
