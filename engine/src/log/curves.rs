//! A run's curves as a PNG, `RUN/pictures/curves.png`, rewritten at the end of every `fit`: the
//! train loss of every optimizer step (log axis), the scheduled learning rate, and each metric
//! of the evaluations `metrics.jsonl` holds (one panel each, against the step).
use std::path::Path;

use anyhow::Result;

use crate::picture::{LinePlot, RgbImage, Series};

/// Width of the picture and height of one panel, pixels.
const WIDTH: u32 = 900;
const PANEL: u32 = 330;

/// The panels of [`write_curves`]: loss, lr, then the evaluation metrics in name order.
pub fn curve_plots(
    objective: &str,
    loss_name: &str,
    losses: &[f64],
    lrs: &[f64],
    evals: &[serde_json::Map<String, serde_json::Value>],
) -> Vec<LinePlot> {
    let steps = |v: &[f64]| -> Vec<(f64, f64)> {
        v.iter()
            .enumerate()
            .map(|(i, &y)| ((i + 1) as f64, y))
            .collect()
    };
    let mut plots = vec![
        LinePlot {
            title: format!("{objective}: train loss of every step (log axis)"),
            x_label: "step".into(),
            y_label: loss_name.to_string(),
            series: vec![Series {
                name: format!("{objective}: {loss_name}"),
                points: steps(losses),
                ..Default::default()
            }],
            log_y: true,
            ..Default::default()
        },
        LinePlot {
            title: "learning rate (the schedule's base lr)".into(),
            x_label: "step".into(),
            y_label: "lr".into(),
            series: vec![Series {
                name: "lr".into(),
                points: steps(lrs),
                ..Default::default()
            }],
            ..Default::default()
        },
    ];
    let mut names: Vec<String> = evals
        .iter()
        .flat_map(|r| r.keys().cloned())
        .filter(|k| !matches!(k.as_str(), "step" | "epoch" | "split"))
        .collect();
    names.sort();
    names.dedup();
    for name in names {
        let points: Vec<(f64, f64)> = evals
            .iter()
            .filter_map(|r| Some((r.get("step")?.as_f64()?, r.get(&name)?.as_f64()?)))
            .collect();
        plots.push(LinePlot {
            title: format!("evaluation: {name}"),
            x_label: "step".into(),
            y_label: name.clone(),
            series: vec![Series {
                name: format!("eval {name}"),
                points,
                ..Default::default()
            }],
            ..Default::default()
        });
    }
    plots
}

/// Draws [`curve_plots`] one under the other into `path` (PNG).
pub fn write_curves(
    path: &Path,
    objective: &str,
    loss_name: &str,
    losses: &[f64],
    lrs: &[f64],
    evals: &[serde_json::Map<String, serde_json::Value>],
) -> Result<()> {
    let plots = curve_plots(objective, loss_name, losses, lrs, evals);
    let mut img = RgbImage::new(WIDTH, PANEL * plots.len() as u32, [255, 255, 255]);
    for (i, p) in plots.iter().enumerate() {
        img.blit(&p.render(WIDTH, PANEL), 0, PANEL * i as u32);
    }
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    img.save_png(path)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_panel_per_curve_and_per_eval_metric() {
        let eval = |step: u64, top1: f64| {
            serde_json::json!({"step": step, "epoch": 0, "split": "eval", "top1": top1, "loss": 1.0})
                .as_object()
                .unwrap()
                .clone()
        };
        let evals = [eval(10, 50.0), eval(20, 60.0)];
        let plots = curve_plots("toy", "toy L1", &[2.0, 1.5, 1.0], &[0.1, 0.2, 0.1], &evals);
        let titles: Vec<&str> = plots.iter().map(|p| p.title.as_str()).collect();
        assert_eq!(
            titles,
            [
                "toy: train loss of every step (log axis)",
                "learning rate (the schedule's base lr)",
                "evaluation: loss",
                "evaluation: top1"
            ]
        );
        assert_eq!(plots[0].series[0].points[2], (3.0, 1.0));
        assert_eq!(plots[0].y_label, "toy L1");
        assert_eq!(plots[3].series[0].points, vec![(10.0, 50.0), (20.0, 60.0)]);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("pictures/curves.png");
        write_curves(
            &p,
            "toy",
            "toy L1",
            &[2.0, 1.5, 1.0],
            &[0.1, 0.2, 0.1],
            &evals,
        )
        .unwrap();
        let bytes = std::fs::read(&p).unwrap();
        assert_eq!(&bytes[1..4], b"PNG");
    }
}
