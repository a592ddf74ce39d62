//! The mIoU evaluator against the independent NumPy implementation of mmseg's `IoUMetric` in
//! scripts/make_miou_fixtures.py, on the label-map PNG folders of tests/fixtures/miou/: the summed
//! areas exactly, the metrics to 1e-12 (the same ratios in f64; NumPy's pairwise `nanmean` may
//! round the last bit differently), `null` where mmseg has NaN.
use std::path::{Path, PathBuf};

use mimlab_finetune::segment::miou::{evaluate_dirs, MiouConfig};
use serde_json::Value;

fn fixtures() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/miou")
}

fn close(name: &str, key: &str, got: &Value, want: &Value) {
    match (got.as_f64(), want.as_f64()) {
        (Some(g), Some(w)) => assert!((g - w).abs() <= 1e-12, "{name} {key}: {g} vs {w}"),
        _ => assert!(
            got.is_null() && want.is_null(),
            "{name} {key}: {got} vs {want}"
        ),
    }
}

#[test]
fn every_fixture_equals_the_mmseg_rules() {
    let mut names: Vec<String> = std::fs::read_dir(fixtures())
        .unwrap()
        .map(|e| e.unwrap().file_name().into_string().unwrap())
        .collect();
    names.sort();
    let want_cases = [
        "absent_class",
        "ignore",
        "palette",
        "pred_only_class",
        "random",
        "random_reduce_zero_label",
        "reduce_zero_label",
    ];
    assert_eq!(names, want_cases);
    for name in &names {
        let dir = fixtures().join(name);
        let exp: Value =
            serde_json::from_str(&std::fs::read_to_string(dir.join("expected.json")).unwrap())
                .unwrap();
        let cfg = MiouConfig {
            num_classes: exp["num_classes"].as_u64().unwrap() as usize,
            ignore_index: exp["ignore_index"].as_u64().unwrap() as u32,
            reduce_zero_label: exp["reduce_zero_label"].as_bool().unwrap(),
        };
        let (areas, extra) = evaluate_dirs(&dir.join("gt"), &dir.join("pred"), &cfg)
            .unwrap_or_else(|e| panic!("{name}: {e:#}"));
        assert!(extra.is_empty());
        let ints = |k: &str| -> Vec<u64> {
            exp["areas"][k]
                .as_array()
                .unwrap()
                .iter()
                .map(|v| v.as_u64().unwrap())
                .collect()
        };
        assert_eq!(areas.intersect, ints("intersect"), "{name}");
        assert_eq!(areas.pred, ints("pred"), "{name}");
        assert_eq!(areas.label, ints("label"), "{name}");
        let got = areas.summary().to_json();
        for k in ["mIoU", "aAcc", "mAcc"] {
            close(name, k, &got[k], &exp[k]);
        }
        for k in ["IoU", "Acc"] {
            let (g, w) = (got[k].as_array().unwrap(), exp[k].as_array().unwrap());
            assert_eq!(g.len(), cfg.num_classes, "{name} {k}");
            for (c, (g, w)) in g.iter().zip(w).enumerate() {
                close(name, &format!("{k}[{c}]"), g, w);
            }
        }
    }
}

/// The cases the acceptance names, checked on the fixture values themselves so a regenerated
/// fixture cannot silently lose them.
#[test]
fn fixtures_cover_the_named_rules() {
    let read = |n: &str| -> Value {
        let p = fixtures().join(n).join("expected.json");
        serde_json::from_str(&std::fs::read_to_string(p).unwrap()).unwrap()
    };
    // a class only predicted under ignored pixels: absent, null in both lists
    let e = read("ignore");
    assert!(e["IoU"][2].is_null() && e["Acc"][2].is_null());
    // a class only in predictions: IoU 0, Acc null
    let e = read("pred_only_class");
    assert_eq!(e["IoU"][2].as_f64(), Some(0.0));
    assert!(e["Acc"][2].is_null());
    // a class absent everywhere
    let e = read("absent_class");
    assert!(e["IoU"][2].is_null() && e["Acc"][2].is_null());
    assert!(read("reduce_zero_label")["reduce_zero_label"]
        .as_bool()
        .unwrap());
    assert!(read("palette")["palette_gt"].as_bool().unwrap());
}
