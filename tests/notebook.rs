//! The analysis notebook (`notebooks/analyze_runs.ipynb`) executed headless, as a user would run
//! it, against tiny runs of every kind made here: its Python side comes from
//! `scripts/setup-notebook.sh` (a venv), `scripts/run_notebook.py` runs it with nbclient and fails
//! when a cell raises, and the executed notebook's outputs are checked against the runs.
mod common;

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;

use common::{ok, require_data, TINY};

const ROOT: &str = env!("CARGO_MANIFEST_DIR");

fn text(out: &Output) -> String {
    format!(
        "status {}\n--- stdout\n{}\n--- stderr\n{}",
        out.status,
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    )
}

/// The venv's python, from `scripts/setup-notebook.sh` (once per test binary: the tests run in
/// parallel threads, the script also locks).
fn venv_python() -> &'static Path {
    static PY: OnceLock<PathBuf> = OnceLock::new();
    PY.get_or_init(|| {
        let out = Command::new("bash")
            .arg("scripts/setup-notebook.sh")
            .current_dir(ROOT)
            .output()
            .expect("bash runs");
        assert!(
            out.status.success(),
            "scripts/setup-notebook.sh failed: {}",
            text(&out)
        );
        let stdout = String::from_utf8_lossy(&out.stdout);
        let py = PathBuf::from(stdout.lines().last().expect("the python path").trim());
        assert!(py.is_file(), "{}: not a file: {}", py.display(), text(&out));
        py
    })
}

/// `scripts/run_notebook.py NOTEBOOK OUT EXTRA...` with MIMLAB_RUNS=runs, headless.
fn run_notebook(notebook: &Path, out: &Path, runs: &Path, extra: &[&str]) -> Output {
    Command::new(venv_python())
        .arg("scripts/run_notebook.py")
        .args(extra)
        .arg(notebook)
        .arg(out)
        .env("MIMLAB_RUNS", runs)
        .env("MPLBACKEND", "Agg")
        .current_dir(ROOT)
        .output()
        .expect("the venv's python runs")
}

/// One executed code cell: its id, its stream text, how many PNGs it displayed.
struct Cell {
    id: String,
    text: String,
    pngs: usize,
}

fn executed_cells(path: &Path) -> Vec<Cell> {
    let nb: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let joined = |v: &serde_json::Value| match v {
        serde_json::Value::Array(a) => a.iter().filter_map(|s| s.as_str()).collect::<String>(),
        v => v.as_str().unwrap_or_default().to_string(),
    };
    nb["cells"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|c| c["cell_type"] == "code")
        .map(|c| {
            let outs = c["outputs"].as_array().unwrap();
            let errors: Vec<&serde_json::Value> = outs
                .iter()
                .filter(|o| o["output_type"] == "error")
                .collect();
            assert!(errors.is_empty(), "cell {}: {errors:?}", c["id"]);
            Cell {
                id: c["id"].as_str().unwrap().to_string(),
                text: outs
                    .iter()
                    .filter(|o| o["output_type"] == "stream")
                    .map(|o| joined(&o["text"]))
                    .collect(),
                pngs: outs
                    .iter()
                    .filter(|o| o["data"]["image/png"].is_string())
                    .count(),
            }
        })
        .collect()
}

fn cell<'a>(cells: &'a [Cell], id: &str) -> &'a Cell {
    cells
        .iter()
        .find(|c| c.id == id)
        .unwrap_or_else(|| panic!("no code cell `{id}` in the executed notebook"))
}

/// The line of `text` that starts with `start` (a table row or a run's line).
fn line<'a>(text: &'a str, start: &str) -> &'a str {
    text.lines()
        .find(|l| l.trim_start().starts_with(start))
        .unwrap_or_else(|| panic!("no line starting with {start:?} in:\n{text}"))
}

#[test]
fn notebook_reads_tiny_runs_of_every_kind() {
    require_data();
    let dir = tempfile::tempdir().unwrap();
    let runs = dir.path().join("runs");
    let out_dir = format!("run.output_dir={}", runs.display());
    // the tiny model and data of tests/cli.rs
    let tiny: Vec<&str> = TINY.into_iter().chain([out_dir.as_str()]).collect();
    let run = |head: &[&str], extra: &[&str]| {
        let mut a: Vec<&str> = head.to_vec();
        for s in tiny.iter().chain(extra) {
            a.extend(["--set", s]);
        }
        ok(&a);
    };
    let pre = runs.join("pre");
    let pre_s = pre.to_str().unwrap();
    run(
        &["pretrain"],
        &[
            "run.name=pre",
            "train.max_steps=4",
            "simmim.mask_patch_size=8",
            "run.image_every=2",
        ],
    );
    run(
        &[
            "finetune",
            "-c",
            "configs/finetune/swinv2_nano_fmnist.yaml",
            "--init",
            pre_s,
        ],
        &[
            "run.name=ft",
            "model.num_classes=10",
            "data.max_samples=48",
            "train.max_steps=3",
            "train.epochs=2",
            "run.eval_every_epochs=1",
        ],
    );
    let probe = runs.join("pre-probe");
    run(
        &[
            "probe",
            "--init",
            pre_s,
            "--fractions",
            "0.5,1",
            "--out",
            probe.to_str().unwrap(),
        ],
        &["finetune.probe_epochs=2"],
    );
    run(
        &[
            "distill",
            "--config",
            "configs/fd/swinv2_nano_fmnist.yaml",
            "--teacher",
            pre_s,
        ],
        &["run.name=student", "train.max_steps=2"],
    );

    let executed = dir.path().join("executed.ipynb");
    let out = run_notebook(
        Path::new("notebooks/analyze_runs.ipynb"),
        &executed,
        &runs,
        &["--require-clean"],
    );
    assert!(out.status.success(), "the notebook failed: {}", text(&out));
    let cells = executed_cells(&executed);

    // the kernel is the venv's python, reading the temp folder
    let setup = &cell(&cells, "setup").text;
    assert!(setup.contains(".venv-notebook"), "{setup}");
    assert!(setup.contains(runs.to_str().unwrap()), "{setup}");

    // inventory: each run with its kind and steps, the probe, what is missing
    let inv = &cell(&cells, "inventory").text;
    for (name, kind, steps) in [
        ("pre ", "pretrain (SimMIM)", "4"),
        ("ft ", "finetune (classification)", "3"),
        ("student ", "distill (FD)", "2"),
    ] {
        let l = line(inv, name);
        assert!(l.contains(kind), "{l}");
        let cols: Vec<&str> = l.split_whitespace().collect();
        assert!(cols.contains(&steps) && cols.contains(&"checkpoint"), "{l}");
    }
    assert!(line(inv, "pre-probe ").contains("probe.json"), "{inv}");
    for missing in [
        "NOT FOUND: no finetune (detection, FCOS) run",
        "NOT FOUND: no finetune (segmentation) run",
        "NOT FOUND: no sweep folders",
    ] {
        assert!(inv.contains(missing), "{missing}: {inv}");
    }

    // curves: the SimMIM loss from the event file, labelled by its objective, and the others
    let curves = cell(&cells, "curves");
    let l = line(&curves.text, "pre (simmim): train/loss 4 points");
    assert!(l.contains("[masked L1"), "{l}");
    let l = line(&curves.text, "student (distill): train/loss 2 points");
    assert!(l.contains("smooth-L1 to whitened teacher features"), "{l}");
    let l = line(&curves.text, "ft (classify): train/loss 3 points");
    assert!(l.contains("cross-entropy"), "{l}");
    assert_eq!(curves.pngs, 3, "one figure per kind: {}", curves.text);

    // evaluation: the finetune's eval curve and final.json agree with the run's own report
    let report: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(runs.join("ft/eval/final.json")).unwrap())
            .unwrap();
    let top1 = report["top1"].as_f64().unwrap();
    let close = |s: &str| (s.parse::<f64>().unwrap() - top1).abs() <= 0.005 * top1.max(1.0);
    let evalc = cell(&cells, "evalcurves");
    let l = line(&evalc.text, "ft: last evaluation at step 3: top1 ");
    assert!(
        close(l.split_whitespace().nth(7).unwrap().trim_end_matches(',')),
        "{l} vs {top1}"
    );
    assert_eq!(evalc.pngs, 1, "{}", evalc.text);
    let fin = &cell(&cells, "final").text;
    let cols: Vec<&str> = line(fin, "ft ").split_whitespace().collect();
    assert_eq!(cols[1..3], ["final.json", "48"], "{fin}");
    assert!(close(cols[3]), "{fin} vs {top1}");

    // probe rows: one per label fraction, of the pretraining's last checkpoint
    let probes = &cell(&cells, "probes").text;
    let rows: Vec<&str> = probes
        .lines()
        .filter(|l| l.starts_with("pre-probe "))
        .collect();
    assert_eq!(rows.len(), 2, "{probes}");
    assert!(rows.iter().all(|r| r.contains("pre @ step_4")), "{probes}");

    // no sweep here: the sections say so and draw nothing
    let sweeps = cell(&cells, "sweeps");
    assert!(
        sweeps
            .text
            .contains("NOT FOUND: no sweep folders (sweep.yaml) under")
            && sweeps.text.contains("no accuracy-vs-AvgDist figure"),
        "{}",
        sweeps.text
    );
    assert_eq!(sweeps.pngs, 0);
    assert!(cell(&cells, "avgdist")
        .text
        .contains("NOT FOUND: no AvgDist tables"));

    // pictures: the reconstructions at steps 2 and 4, each run's curves.png, the confusion matrix
    let pics = cell(&cells, "pictures");
    let l = line(&pics.text, "pre (simmim): ");
    assert!(
        l.contains("pictures/recon_step2.png") && l.contains("pictures/recon_step4.png"),
        "{l}"
    );
    assert!(line(&pics.text, "ft (classify): ").contains("eval/final_confusion.png"));
    assert!(pics.pngs >= 6, "{} pictures: {}", pics.pngs, pics.text);
}

/// The runner fails on a raising cell (with the cell's error) and on a committed notebook that
/// stores outputs; against an empty folder the notebook says what it did not find and raises
/// nothing.
#[test]
fn notebook_runner_fails_when_a_cell_raises() {
    let dir = tempfile::tempdir().unwrap();
    let cell = |id: &str, src: &str, count: serde_json::Value, outputs: serde_json::Value| {
        serde_json::json!({"cell_type": "code", "id": id, "metadata": {}, "source": src,
                           "execution_count": count, "outputs": outputs})
    };
    let notebook = |cells: Vec<serde_json::Value>| {
        serde_json::json!({"cells": cells, "nbformat": 4, "nbformat_minor": 5, "metadata": {
            "kernelspec": {"name": "python3", "display_name": "Python 3", "language": "python"}}})
    };
    let raising = dir.path().join("raising.ipynb");
    std::fs::write(
        &raising,
        notebook(vec![
            cell(
                "a",
                "x = 1\nprint('first cell ran')",
                serde_json::Value::Null,
                serde_json::json!([]),
            ),
            cell(
                "b",
                "raise ValueError('boom from the second cell')",
                serde_json::Value::Null,
                serde_json::json!([]),
            ),
            cell(
                "c",
                "print('never')",
                serde_json::Value::Null,
                serde_json::json!([]),
            ),
        ])
        .to_string(),
    )
    .unwrap();
    let out = run_notebook(&raising, &dir.path().join("out.ipynb"), dir.path(), &[]);
    assert_eq!(out.status.code(), Some(1), "{}", text(&out));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains("a cell raised") && err.contains("ValueError: boom from the second cell"),
        "{err}"
    );
    // the partly executed notebook is written: first cell ran, third did not
    let nb: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(dir.path().join("out.ipynb")).unwrap())
            .unwrap();
    assert_eq!(nb["cells"][0]["execution_count"], 1);
    assert!(nb["cells"][2]["execution_count"].is_null());

    let dirty = dir.path().join("dirty.ipynb");
    std::fs::write(
        &dirty,
        notebook(vec![cell(
            "a",
            "print(1)",
            serde_json::json!(3),
            serde_json::json!([{"output_type": "stream", "name": "stdout", "text": "1\n"}]),
        )])
        .to_string(),
    )
    .unwrap();
    let out = run_notebook(
        &dirty,
        &dir.path().join("o.ipynb"),
        dir.path(),
        &["--require-clean"],
    );
    assert_eq!(out.status.code(), Some(2), "{}", text(&out));
    assert!(String::from_utf8_lossy(&out.stderr).contains("store outputs"));

    // an empty root: every section says what it did not find, no cell raises
    let empty = dir.path().join("empty");
    std::fs::create_dir(&empty).unwrap();
    let executed = dir.path().join("empty.ipynb");
    let out = run_notebook(
        Path::new("notebooks/analyze_runs.ipynb"),
        &executed,
        &empty,
        &[],
    );
    assert!(
        out.status.success(),
        "the notebook failed on an empty folder: {}",
        text(&out)
    );
    for c in executed_cells(&executed) {
        if c.id != "setup" {
            assert!(
                c.text.contains("NOT FOUND"),
                "cell {} is silent: {}",
                c.id,
                c.text
            );
            assert_eq!(c.pngs, 0, "cell {}", c.id);
        }
    }
}
