//! Data-loader throughput (decode + augment + batch), printed as a table:
//! `cargo bench -p mimlab-engine --bench loader`. Needs `bash scripts/setup-data.sh` first.
use std::path::PathBuf;
use std::time::Instant;

use mimlab_engine::data::{build_dataset, DataConfig, DataLoader, LoaderOptions, Split};

fn main() -> anyhow::Result<()> {
    let root = match std::env::var_os("MIMLAB_DATA") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../data"),
    };
    println!("| dataset | size | workers | open (s) | images/s |");
    println!("|---|---|---|---|---|");
    for (name, size, workers) in [
        ("fashion-mnist", 32, 1),
        ("fashion-mnist", 32, 2),
        ("fashion-mnist", 192, 2),
        ("photos", 64, 2),
        ("photos", 192, 2),
    ] {
        let cfg = DataConfig {
            dataset: name.into(),
            root: root.clone(),
            ..Default::default()
        };
        let t0 = Instant::now();
        let ds = build_dataset(&cfg, Split::Train, size, 3, true)?;
        let open = t0.elapsed().as_secs_f64();
        let opts = LoaderOptions {
            batch_size: 64,
            shuffle: true,
            drop_last: true,
            seed: 0,
            workers,
            prefetch: 4,
        };
        let loader = DataLoader::new(ds, opts);
        // One warm-up batch, then 16 timed ones.
        let mut it = loader.epoch(0, 0);
        it.next().transpose()?;
        let t0 = Instant::now();
        let mut n = 0;
        for b in it.take(16) {
            n += b?.indices.len();
        }
        let rate = n as f64 / t0.elapsed().as_secs_f64();
        println!("| {name} | {size} | {workers} | {open:.2} | {rate:.0} |");
    }
    Ok(())
}
