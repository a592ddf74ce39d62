//! Candle forward vs PyTorch (timm and the official Swin-Transformer code) on the fixtures of
//! scripts/make_fixtures.py, for both checkpoint layouts.
use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use mimlab_engine::init::seeded_var_builder;
use mimlab_engine::rng::SharedRng;
use mimlab_models::checkpoint::{load_into_varmap, read_safetensors, Layout, LoadOptions};
use mimlab_models::swin_v2::{SwinV2, SwinV2Config};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

fn config_of(path: &PathBuf) -> Result<SwinV2Config> {
    let bytes = std::fs::read(path)?;
    let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes)?;
    let json = meta
        .metadata()
        .as_ref()
        .and_then(|m| m.get("config"))
        .context("no config")?;
    Ok(serde_json::from_str(json)?)
}

/// max |a - b| / max |b|
fn rel_err(a: &Tensor, b: &Tensor) -> Result<f32> {
    assert_eq!(a.dims(), b.dims());
    let d = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    let s = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    Ok(d / s)
}

fn check(model: &str, layout: &str, expect: Layout) -> Result<()> {
    let io = read_safetensors(&fixture(&format!("{model}.io.safetensors")))?;
    let cfg = config_of(&fixture(&format!("{model}.io.safetensors")))?;
    let vm = VarMap::new();
    let vb = seeded_var_builder(&vm, 0, DType::F32, &Device::Cpu);
    let m = SwinV2::new(&cfg, false, SharedRng::new(0), vb)?;
    assert_eq!(
        vm.all_vars().iter().map(|v| v.elem_count()).sum::<usize>(),
        cfg.num_params()
    );
    let weights = read_safetensors(&fixture(&format!("{model}.{layout}.safetensors")))?;
    let report = load_into_varmap(&vm, weights, &LoadOptions::default())?;
    assert_eq!(report.layout, expect);
    assert_eq!(report.loaded, vm.all_vars().len());
    let x = &io["input"];
    let f = m.forward_features(x, None, false)?;
    let pre = m.pre_logits(&f)?;
    let (logits, _) = m.forward(x, false)?;
    let outs: HashMap<&str, Tensor> = HashMap::from([
        ("logits", logits),
        ("pre_logits", pre),
        ("features", f.stages.last().unwrap().clone()),
        ("stage0", f.stages[0].clone()),
    ]);
    for (k, v) in &outs {
        let want = &io[&format!("{layout}.{k}")];
        let e = rel_err(v, want)?;
        println!("{model} {layout} {k}: rel err {e:.2e}");
        assert!(e <= 1e-4, "{model} {layout} {k}: relative error {e}");
    }
    // train mode without drop path / dropout is the same function (differentiable kernels)
    let (t, _) = m.forward(x, true)?;
    assert!(rel_err(&t, &outs["logits"])? <= 1e-5);
    Ok(())
}

#[test]
fn model_a_matches_timm() -> Result<()> {
    check("swinv2_a", "timm", Layout::Timm)
}

#[test]
fn model_a_matches_official() -> Result<()> {
    check("swinv2_a", "official", Layout::Official)
}

#[test]
fn model_b_matches_timm() -> Result<()> {
    check("swinv2_b", "timm", Layout::Timm)
}

#[test]
fn model_b_matches_official() -> Result<()> {
    check("swinv2_b", "official", Layout::Official)
}
