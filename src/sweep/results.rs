//! A sweep's results: what each finished stage reported, gathered per cell into `results.csv`,
//! averaged over seeds per grid point into `results.md` (mean ± sample standard deviation), and
//! drawn per result as `plot_<stage>.<result>.png`. A sweep over SimMIM masks (a grid with
//! `simmim.mask_patch_size` or `simmim.mask_ratio` and a pretrain stage) also gets each point's
//! AvgDist (SimMIM's masking measure, `mimlab avgdist`) in the tables and every result against it
//! as `avgdist_<stage>.<result>.png` (the SimMIM paper's accuracy-vs-AvgDist figure: log axis,
//! error bars over seeds, the paper's best range shaded). A two-key grid (e.g. mask patch size x
//! ratio) also gets every result as a heatmap, `heatmap_<stage>.<result>.png`.
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;

use anyhow::{Context, Result};
use mimlab_engine::fsutil::write_atomic;
use mimlab_engine::picture::{Band, BandAxis, Heatmap, LinePlot, Series};
use mimlab_engine::stats::mean_sd;
use serde::{Deserialize, Serialize};

use super::run::{cell_dir, done_file};
use super::{Cell, Stage, SweepConfig};

/// What `<stage>.done.json` holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct StageDone {
    /// Wall minutes of the stage's command, every attempt added.
    pub minutes: f64,
    /// Its results by name.
    pub results: BTreeMap<String, f64>,
}

/// A training stage's last `train` loss (`train_loss`) and its last evaluation's metrics
/// (`eval_<name>`), from `metrics.jsonl`; a probe's accuracies per label fraction
/// (`knn_top1@0.01`, `linear_top1@0.01`, ...), from `probe.json`.
pub fn stage_results(stage: &Stage, run: &Path) -> Result<BTreeMap<String, f64>> {
    let mut out = BTreeMap::new();
    if stage.command.trains() {
        let path = run.join("metrics.jsonl");
        let text = std::fs::read_to_string(&path)
            .with_context(|| format!("{}: cannot read", path.display()))?;
        for line in text.lines() {
            let Ok(serde_json::Value::Object(row)) = serde_json::from_str(line) else {
                continue;
            };
            let split = row.get("split").and_then(|s| s.as_str()).unwrap_or("");
            let numbers = row
                .iter()
                .filter(|(k, _)| !matches!(k.as_str(), "step" | "epoch" | "split"))
                .filter_map(|(k, v)| v.as_f64().map(|x| (k, x)));
            match split {
                "train" => {
                    if let Some(l) = row.get("loss").and_then(|v| v.as_f64()) {
                        out.insert("train_loss".to_string(), l);
                    }
                }
                "eval" => {
                    for (k, x) in numbers {
                        out.insert(format!("eval_{k}"), x);
                    }
                }
                _ => {}
            }
        }
    } else {
        let path = run.join("probe.json");
        let doc: serde_json::Value = serde_json::from_str(
            &std::fs::read_to_string(&path)
                .with_context(|| format!("{}: cannot read", path.display()))?,
        )
        .with_context(|| format!("{}: not JSON", path.display()))?;
        for row in doc["rows"].as_array().into_iter().flatten() {
            let f = row["label_fraction"].as_f64().unwrap_or(f64::NAN);
            for k in ["knn_top1", "knn_top5", "linear_top1", "linear_top5"] {
                if let Some(x) = row[k].as_f64() {
                    out.insert(format!("{k}@{f}"), x);
                }
            }
        }
    }
    Ok(out)
}

/// One cell's results: `<stage>.<result>` and `<stage>.minutes`, for the stages that finished.
#[derive(Debug, Clone)]
pub struct CellRow {
    /// The cell.
    pub cell: Cell,
    /// Its results.
    pub values: BTreeMap<String, f64>,
}

/// The results of every cell, from the `*.done.json` files.
pub fn collect(cfg: &SweepConfig) -> Result<Vec<CellRow>> {
    let mut rows = vec![];
    for cell in cfg.cells()? {
        let dir = cell_dir(cfg, &cell);
        let mut values = BTreeMap::new();
        for stage in &cfg.stages {
            let p = done_file(&dir, stage);
            let Ok(text) = std::fs::read_to_string(&p) else {
                continue;
            };
            let done: StageDone = serde_json::from_str(&text)
                .with_context(|| format!("{}: not a stage record", p.display()))?;
            values.insert(format!("{}.minutes", stage.name), done.minutes);
            for (k, v) in done.results {
                values.insert(format!("{}.{k}", stage.name), v);
            }
        }
        rows.push(CellRow { cell, values });
    }
    Ok(rows)
}

/// Each grid point's AvgDist in pixels.
pub struct PointAvgDist {
    /// The pretraining image size (of the first grid point).
    pub img_size: usize,
    /// Per grid point; None where the masks cover every pixel (AvgDist undefined).
    pub values: Vec<Option<f64>>,
}

/// Each grid point's AvgDist in pixels (200 seeded masks of the pretrain stage's image size,
/// mask patch, ratio and strategy), when the grid varies SimMIM's mask; None otherwise.
pub fn point_avgdist(cfg: &SweepConfig) -> Result<Option<PointAvgDist>> {
    let varies = cfg.grid.keys().any(|k| {
        matches!(
            k.as_str(),
            Some("simmim.mask_patch_size" | "simmim.mask_ratio")
        )
    });
    let Some(stage) = cfg
        .stages
        .iter()
        .find(|s| s.command == super::Command::Pretrain && s.grid)
    else {
        return Ok(None);
    };
    if !varies {
        return Ok(None);
    }
    let mut out = vec![];
    let mut img_size = 0;
    for p in cfg.points()? {
        let mut sets = stage.set.clone();
        sets.extend(p.sets());
        let exp = crate::experiment::Experiment::load(Some(&stage.config), &sets)
            .with_context(|| format!("AvgDist of grid point {}", p.label()))?;
        let m = &exp.simmim;
        if out.is_empty() {
            img_size = exp.model.img_size;
        }
        let t = mimlab_pretrain::avgdist::avgdist_table(
            exp.model.img_size,
            &[m.mask_patch_size],
            &[m.mask_ratio],
            &[m.mask_strategy],
            200,
            0,
        )?;
        out.push(t.rows.first().map(|r| r.avgdist));
    }
    Ok(Some(PointAvgDist {
        img_size,
        values: out,
    }))
}

/// `results.csv`, `results.md` and the plots, in the sweep folder.
pub fn write_results(cfg: &SweepConfig, rows: &[CellRow]) -> Result<()> {
    let dir = cfg.dir();
    let avgdist = point_avgdist(cfg)?;
    // AvgDist is a property of the grid point: a column like a result
    let rows: Vec<CellRow> = rows
        .iter()
        .map(|r| {
            let mut r = r.clone();
            if let Some(Some(d)) = avgdist.as_ref().map(|a| a.values[r.cell.point.index]) {
                r.values.insert("avgdist".into(), d);
            }
            r
        })
        .collect();
    let rows = &rows[..];
    let keys: Vec<String> = cfg
        .grid
        .keys()
        .filter_map(|k| k.as_str().map(String::from))
        .collect();
    let columns: Vec<String> = rows
        .iter()
        .flat_map(|r| r.values.keys().cloned())
        .collect::<BTreeSet<_>>()
        .into_iter()
        .collect();
    // CSV: a row per cell
    let mut csv = String::from("point,seed");
    for k in keys.iter().chain(&columns) {
        csv.push_str(&format!(",{k}"));
    }
    csv.push('\n');
    for r in rows {
        csv.push_str(&format!("{},{}", r.cell.point.index, r.cell.seed));
        for (_, v) in &r.cell.point.values {
            csv.push_str(&format!(",{}", v.replace(',', ";")));
        }
        for c in &columns {
            match r.values.get(c) {
                Some(v) => csv.push_str(&format!(",{v}")),
                None => csv.push(','),
            }
        }
        csv.push('\n');
    }
    write_atomic(&dir.join("results.csv"), csv.as_bytes())?;

    // Markdown: mean ± sd over the seeds of each grid point
    let points = cfg.points()?;
    let stat = |p: usize, c: &str| -> Vec<f64> {
        rows.iter()
            .filter(|r| r.cell.point.index == p)
            .filter_map(|r| r.values.get(c).copied())
            .collect()
    };
    let mut md = format!(
        "# Sweep `{}`: mean ± sd over seeds {:?}\n\n| point |",
        cfg.name, cfg.seeds
    );
    for k in keys.iter().chain(&columns) {
        md.push_str(&format!(" {k} |"));
    }
    md.push_str("\n|---|");
    md.push_str(&"---|".repeat(keys.len() + columns.len()));
    md.push('\n');
    for p in &points {
        md.push_str(&format!("| {} |", p.index));
        for (_, v) in &p.values {
            md.push_str(&format!(" {v} |"));
        }
        for c in &columns {
            let xs = stat(p.index, c);
            if xs.is_empty() {
                md.push_str(" - |");
            } else {
                let (m, sd) = mean_sd(&xs);
                md.push_str(&format!(" {} |", fmt_stat(m, sd, xs.len())));
            }
        }
        md.push('\n');
    }
    write_atomic(&dir.join("results.md"), md.as_bytes())?;

    // a plot per result: mean over seeds against the first grid key, a curve per value of the
    // others; and against AvgDist where the grid varies the mask
    for c in columns.iter().filter(|c| *c != "avgdist") {
        let file = c.replace(['/', '@'], "_");
        if let Some(plot) = plot_of(cfg, &points, c, &stat)? {
            plot.render(900, 560)
                .save_png(&dir.join(format!("plot_{file}.png")))?;
        }
        if let Some(d) = &avgdist {
            if let Some(plot) = avgdist_plot(cfg, d, c, &stat) {
                plot.render(900, 560)
                    .save_png(&dir.join(format!("avgdist_{file}.png")))?;
            }
        }
        if let Some(h) = heatmap_of(cfg, &points, c, &stat) {
            h.render()
                .save_png(&dir.join(format!("heatmap_{file}.png")))?;
        }
    }
    Ok(())
}

/// Result `c` (mean over seeds) as a heatmap over a two-key grid: the first key's values as
/// rows, the second's as columns (e.g. mask patch size x mask ratio). None for other grids.
fn heatmap_of(
    cfg: &SweepConfig,
    points: &[super::Point],
    c: &str,
    stat: &dyn Fn(usize, &str) -> Vec<f64>,
) -> Option<Heatmap> {
    let first = points.first()?;
    if first.values.len() != 2 {
        return None;
    }
    let mut rows: Vec<String> = vec![];
    let mut cols: Vec<String> = vec![];
    for p in points {
        let (r, q) = (&p.values[0].1, &p.values[1].1);
        if !rows.contains(r) {
            rows.push(r.clone());
        }
        if !cols.contains(q) {
            cols.push(q.clone());
        }
    }
    let mut values = vec![vec![f64::NAN; cols.len()]; rows.len()];
    let mut any = false;
    for p in points {
        let xs = stat(p.index, c);
        if xs.is_empty() {
            continue;
        }
        let r = rows.iter().position(|v| *v == p.values[0].1)?;
        let q = cols.iter().position(|v| *v == p.values[1].1)?;
        values[r][q] = mean_sd(&xs).0;
        any = true;
    }
    any.then(|| Heatmap {
        title: format!(
            "sweep {}: {c}, mean over {} seeds",
            cfg.name,
            cfg.seeds.len()
        ),
        values,
        row_labels: rows,
        col_labels: cols,
        row_title: first.values[0].0.clone(),
        col_title: first.values[1].0.clone(),
    })
}

/// Result `c` against each grid point's AvgDist (log axis): the mean over seeds with ± sd error
/// bars, points in AvgDist order, and the SimMIM paper's best AvgDist range scaled to the
/// pretraining image size shaded.
fn avgdist_plot(
    cfg: &SweepConfig,
    avgdist: &PointAvgDist,
    c: &str,
    stat: &dyn Fn(usize, &str) -> Vec<f64>,
) -> Option<LinePlot> {
    let mut pts: Vec<(f64, f64, f64)> = avgdist
        .values
        .iter()
        .enumerate()
        .filter_map(|(i, d)| {
            let xs = stat(i, c);
            let d = (*d)?;
            (!xs.is_empty()).then(|| {
                let (m, sd) = mean_sd(&xs);
                (d, m, sd)
            })
        })
        .collect();
    if pts.is_empty() {
        return None;
    }
    pts.sort_by(|a, b| a.0.total_cmp(&b.0));
    let (lo, hi) = mimlab_pretrain::avgdist::paper_band(avgdist.img_size);
    Some(LinePlot {
        title: format!("sweep {}: {c} against AvgDist", cfg.name),
        x_label:
            "AvgDist (px, log axis): mean distance of masked pixels to the nearest visible one"
                .into(),
        y_label: c.to_string(),
        series: vec![Series {
            name: format!("mean ± sd over {} seeds", cfg.seeds.len()),
            points: pts.iter().map(|p| (p.0, p.1)).collect(),
            errors: pts.iter().map(|p| p.2).collect(),
        }],
        log_x: true,
        bands: vec![Band {
            axis: BandAxis::X,
            lo,
            hi,
            label: mimlab_pretrain::avgdist::paper_band_label(avgdist.img_size),
        }],
        ..Default::default()
    })
}

/// `mean ± sd (n)`, digits by magnitude.
fn fmt_stat(m: f64, sd: f64, n: usize) -> String {
    let d = if m.abs() >= 10.0 { 2 } else { 4 };
    if n > 1 {
        format!("{m:.d$} ± {sd:.d$} ({n})")
    } else {
        format!("{m:.d$}")
    }
}

/// The plot of result `c`, or None where no point has it.
fn plot_of(
    cfg: &SweepConfig,
    points: &[super::Point],
    c: &str,
    stat: &dyn Fn(usize, &str) -> Vec<f64>,
) -> Result<Option<LinePlot>> {
    let first = points
        .first()
        .and_then(|p| p.values.first())
        .map(|(k, _)| k.clone());
    let numeric = points.iter().all(|p| {
        p.values
            .first()
            .is_none_or(|(_, v)| v.parse::<f64>().is_ok())
    });
    let mut series: BTreeMap<String, Vec<(f64, f64)>> = BTreeMap::new();
    for p in points {
        let xs = stat(p.index, c);
        if xs.is_empty() {
            continue;
        }
        let x = match p.values.first() {
            Some((_, v)) if numeric => v.parse::<f64>()?,
            _ => p.index as f64,
        };
        let rest: Vec<String> = p
            .values
            .iter()
            .skip(1)
            .map(|(k, v)| format!("{k}={v}"))
            .collect();
        let name = if rest.is_empty() {
            format!("mean over {} seeds", cfg.seeds.len())
        } else {
            rest.join(", ")
        };
        series.entry(name).or_default().push((x, mean_sd(&xs).0));
    }
    if series.is_empty() {
        return Ok(None);
    }
    Ok(Some(LinePlot {
        title: format!("sweep {}: {c}", cfg.name),
        x_label: match (&first, numeric) {
            (Some(k), true) => k.clone(),
            _ => "grid point".into(),
        },
        y_label: c.to_string(),
        series: series
            .into_iter()
            .map(|(name, points)| Series {
                name,
                points,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    }))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::sweep::Command;

    fn stage(command: Command) -> Stage {
        Stage {
            name: "s".into(),
            command,
            config: "c.yaml".into(),
            set: vec![],
            grid: true,
            init: None,
            teacher: None,
            fractions: None,
        }
    }

    #[test]
    fn results_of_a_training_run_and_a_probe() -> Result<()> {
        let d = tempfile::tempdir()?;
        std::fs::write(
            d.path().join("metrics.jsonl"),
            "{\"step\":10,\"epoch\":0,\"split\":\"train\",\"loss\":2.5,\"lr\":0.1}\n\
             {\"step\":20,\"epoch\":0,\"split\":\"eval\",\"top1\":40.0,\"loss\":1.9}\n\
             {\"step\":20,\"epoch\":1,\"split\":\"train\",\"loss\":1.5}\n\
             {\"step\":40,\"epoch\":1,\"split\":\"eval\",\"top1\":55.5,\"loss\":1.2}\nhalf a li",
        )?;
        let r = stage_results(&stage(Command::Finetune), d.path())?;
        let want: BTreeMap<String, f64> = [
            ("train_loss".to_string(), 1.5),
            ("eval_top1".to_string(), 55.5),
            ("eval_loss".to_string(), 1.2),
        ]
        .into();
        assert_eq!(r, want);
        std::fs::write(
            d.path().join("probe.json"),
            r#"{"rows": [{"label_fraction": 0.01, "labels": 600, "knn_top1": 61.5,
                "knn_top5": 90.0, "linear_top1": 63.25, "linear_top5": 91.0}]}"#,
        )?;
        let r = stage_results(&stage(Command::Probe), d.path())?;
        assert_eq!(r["knn_top1@0.01"], 61.5);
        assert_eq!(r["linear_top1@0.01"], 63.25);
        assert_eq!(r.len(), 4);
        Ok(())
    }

    #[test]
    fn heatmap_over_a_two_key_grid() -> Result<()> {
        let cfg: SweepConfig = serde_yaml_ng::from_str(
            "name: h\ngrid:\n  simmim.mask_patch_size: [4, 8]\n  simmim.mask_ratio: [0.3, 0.6, 0.8]\n\
             stages:\n  - {name: p, command: pretrain, config: c.yaml}\n",
        )?;
        let points = cfg.points()?;
        // the result is 10 * patch + 100 * ratio, point 4 (8 px, 0.6) has no result
        let stat = |i: usize, _: &str| -> Vec<f64> {
            if i == 4 {
                return vec![];
            }
            let p = &points[i];
            let (a, b): (f64, f64) = (
                p.values[0].1.parse().unwrap(),
                p.values[1].1.parse().unwrap(),
            );
            vec![10.0 * a + 100.0 * b - 1.0, 10.0 * a + 100.0 * b + 1.0]
        };
        let h = heatmap_of(&cfg, &points, "r", &stat).expect("two keys make a heatmap");
        assert_eq!(h.row_labels, ["4", "8"]);
        assert_eq!(h.col_labels, ["0.3", "0.6", "0.8"]);
        assert_eq!(
            (h.row_title.as_str(), h.col_title.as_str()),
            ("simmim.mask_patch_size", "simmim.mask_ratio")
        );
        assert!((h.values[0][2] - 120.0).abs() < 1e-9, "{:?}", h.values);
        assert!((h.values[1][0] - 110.0).abs() < 1e-9, "{:?}", h.values);
        assert!(
            h.values[1][1].is_nan(),
            "a missing result stays empty (gray)"
        );
        let one: SweepConfig = serde_yaml_ng::from_str(
            "name: h\ngrid:\n  simmim.mask_ratio: [0.3, 0.6]\nstages:\n  - {name: p, command: pretrain, config: c.yaml}\n",
        )?;
        assert!(heatmap_of(&one, &one.points()?, "r", &stat).is_none());
        Ok(())
    }

    #[test]
    fn mean_sd_formatting() {
        assert_eq!(fmt_stat(74.64, 0.28284, 2), "74.64 ± 0.28 (2)");
        assert_eq!(fmt_stat(0.6442, 0.0, 1), "0.6442");
    }
}
