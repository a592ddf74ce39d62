//! The segmentation head's ops that candle lacks, against PyTorch (tests/fixtures/
//! seg_ops.safetensors from scripts/make_seg_fixtures.py): `layers::resize_bilinear` equals
//! `F.interpolate(..., mode="bilinear", align_corners=False)` forward and backward on odd sizes up
//! and down, `layers::adaptive_avg_pool2d` equals `F.adaptive_avg_pool2d` (overlapping bins, an
//! output larger than the input), and `segment::loss::cross_entropy_ignore` equals
//! `F.cross_entropy(..., ignore_index=255)` with and without class weights, loss and gradient.
use std::collections::HashMap;
use std::path::Path;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor, Var};
use mimlab_finetune::segment::loss::cross_entropy_ignore;
use mimlab_models::layers::{adaptive_avg_pool2d, resize_bilinear};

fn fixture() -> Result<HashMap<String, Tensor>> {
    let p = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures/seg_ops.safetensors");
    candle_core::safetensors::load(&p, &Device::Cpu).with_context(|| format!("{}", p.display()))
}

fn max_abs(a: &Tensor, b: &Tensor) -> Result<f32> {
    Ok((a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?)
}

/// Every `{prefix}.{k}` case of the fixture through `op`: forward to 1e-5, the gradient of
/// `(y * g).sum()` to 1e-4 (f32 sums in another order); returns the number of cases.
fn check_cases(
    prefix: &str,
    op: impl Fn(&Tensor, usize, usize) -> candle_core::Result<Tensor>,
) -> Result<usize> {
    let t = fixture()?;
    let mut cases = 0;
    while let Some(x) = t.get(&format!("{prefix}.{cases}.x")) {
        let k = cases;
        let size = t[&format!("{prefix}.{k}.size")].to_vec1::<i64>()?;
        let (oh, ow) = (size[0] as usize, size[1] as usize);
        let xv = Var::from_tensor(x)?;
        let y = op(xv.as_tensor(), oh, ow)?;
        let d = max_abs(&y, &t[&format!("{prefix}.{k}.y")])?;
        let what = format!("{prefix} case {k} ({:?} -> {oh}x{ow})", x.dims());
        assert!(d < 1e-5, "{what}: forward differs by {d}");
        let g = (y * &t[&format!("{prefix}.{k}.g")])?
            .sum_all()?
            .backward()?;
        let dx = g.get(&xv).context("no gradient for x")?;
        let d = max_abs(dx, &t[&format!("{prefix}.{k}.dx")])?;
        assert!(d < 1e-4, "{what}: backward differs by {d}");
        cases += 1;
    }
    Ok(cases)
}

#[test]
fn bilinear_matches_pytorch_forward_and_backward() -> Result<()> {
    assert_eq!(check_cases("bilinear", resize_bilinear)?, 6);
    Ok(())
}

#[test]
fn adaptive_avg_pool_matches_pytorch_forward_and_backward() -> Result<()> {
    assert_eq!(check_cases("pool", adaptive_avg_pool2d)?, 6);
    Ok(())
}

#[test]
fn cross_entropy_with_ignore_matches_pytorch() -> Result<()> {
    let t = fixture()?;
    let labels = t["ce.labels"].to_dtype(DType::U32)?;
    let n_ignored = labels
        .to_vec3::<u32>()?
        .concat()
        .concat()
        .iter()
        .filter(|&&v| v == 255)
        .count();
    assert!(
        n_ignored > 10,
        "the fixture has ignored pixels ({n_ignored})"
    );
    for (suffix, w) in [("", None), ("_w", Some(&t["ce.weight"]))] {
        let x = Var::from_tensor(&t["ce.logits"])?;
        let loss = cross_entropy_ignore(x.as_tensor(), &labels, 255, w)?;
        let want = t[&format!("ce.loss{suffix}")].to_vec1::<f32>()?[0];
        let got = loss.to_scalar::<f32>()?;
        assert!((got - want).abs() < 1e-5, "loss{suffix}: {got} vs {want}");
        let g = loss.backward()?;
        let d = max_abs(
            g.get(&x).context("no gradient")?,
            &t[&format!("ce.dlogits{suffix}")],
        )?;
        assert!(d < 1e-6, "dlogits{suffix} differs by {d}");
    }
    Ok(())
}
