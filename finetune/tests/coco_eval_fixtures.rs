//! The COCO box evaluator against pycocotools 2.0.11 on the fixtures of tests/fixtures/coco/
//! (written by scripts/make_coco_fixtures.py): all 12 stats and every per-category AP, compared
//! through their bit patterns.
use std::path::{Path, PathBuf};

use mimlab_engine::data::coco::{load_results, CocoFile};
use mimlab_finetune::detect::coco_eval::{evaluate, evaluate_files, STAT_NAMES};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/coco")
}

fn cases() -> Vec<String> {
    let mut names: Vec<String> = std::fs::read_dir(fixtures())
        .unwrap()
        .filter_map(|e| {
            let n = e.unwrap().file_name().into_string().unwrap();
            n.strip_suffix(".expected.json").map(str::to_string)
        })
        .collect();
    names.sort();
    names
}

#[test]
fn every_fixture_equals_pycocotools() {
    let names = cases();
    assert!(names.len() >= 10, "fixtures: {names:?}");
    let mut max_diff = 0.0f64;
    let mut inexact = vec![];
    for name in &names {
        let dir = fixtures();
        let exp: Value = serde_json::from_str(
            &std::fs::read_to_string(dir.join(format!("{name}.expected.json"))).unwrap(),
        )
        .unwrap();
        let gt = CocoFile::load(&dir.join(format!("{name}.gt.json"))).unwrap();
        let dt = load_results(&dir.join(format!("{name}.dt.json")), &gt).unwrap();
        let got = evaluate(&gt, &dt).unwrap();
        for (i, stat) in STAT_NAMES.iter().enumerate() {
            let want = f64::from_bits(exp["stats_bits"][i].as_u64().unwrap());
            let d = (got.stats[i] - want).abs();
            max_diff = max_diff.max(d);
            assert!(
                d <= 1e-6,
                "{name} {stat}: {} vs pycocotools {want}",
                got.stats[i]
            );
            if got.stats[i].to_bits() != want.to_bits() {
                inexact.push(format!("{name} {stat}: {} vs {want}", got.stats[i]));
            }
        }
        let want_pc = exp["per_class"].as_array().unwrap();
        assert_eq!(got.per_class.len(), want_pc.len(), "{name}");
        for (g, w) in got.per_class.iter().zip(want_pc) {
            assert_eq!(g.id, w["id"].as_u64().unwrap(), "{name}");
            assert_eq!(g.name, w["name"].as_str().unwrap(), "{name}");
            let want = f64::from_bits(w["AP_bits"].as_u64().unwrap());
            let d = (g.ap - want).abs();
            max_diff = max_diff.max(d);
            assert!(d <= 1e-6, "{name} category {}: {} vs {want}", g.id, g.ap);
            if g.ap.to_bits() != want.to_bits() {
                inexact.push(format!("{name} category {}: {} vs {want}", g.id, g.ap));
            }
        }
    }
    // Same algorithm, same operation order, same numpy summation: bit-exact.
    assert!(inexact.is_empty(), "max |diff| {max_diff:e}: {inexact:#?}");
}

#[test]
fn files_api_and_empty_results() {
    let dir = fixtures();
    let s = evaluate_files(&dir.join("crowd.gt.json"), &dir.join("crowd.dt.json")).unwrap();
    assert_eq!(s.per_class[0].name, "person");
    // `empty_results.dt.json` is `[]`: every stat with GT is 0 (pycocotools' loadRes fails there).
    let s = evaluate_files(
        &dir.join("empty_results.gt.json"),
        &dir.join("empty_results.dt.json"),
    )
    .unwrap();
    assert_eq!(s.stats, [0.0; 12]);
    // A missing file is named.
    let e = evaluate_files(&dir.join("crowd.gt.json"), &dir.join("nope.dt.json")).unwrap_err();
    assert!(format!("{e:#}").contains("nope.dt.json"), "{e:#}");
}
