//! Candle forward vs PyTorch (timm and the official Swin-Transformer code) on the fixtures of
//! scripts/make_fixtures.py, for both checkpoint layouts; and vs timm's `dynamic_img_size=True`
//! on input sizes other than the configured one (scripts/make_dyn_fixtures.py).
use std::collections::HashMap;
use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use mimlab_engine::init::seeded_var_builder;
use mimlab_engine::rng::SharedRng;
use mimlab_models::checkpoint::{
    detect_layout, load_into_varmap, read_weights, remap_from_mimlab, remap_to_mimlab, Layout,
    LoadOptions,
};
use mimlab_models::swin_v2::{SwinV2, SwinV2Config};

/// The device the checks run on: `MIMLAB_TEST_DEVICE` (`cpu`, `cuda`, `cuda:N`; default `cpu`),
/// so that a CUDA build checks its GPU path against the same PyTorch numbers:
/// `MIMLAB_TEST_DEVICE=cuda cargo test --release --features cuda -p mimlab-models --test fixtures`.
/// Inputs go to the device, outputs come back to the CPU to be compared.
fn device() -> Device {
    let spec = std::env::var("MIMLAB_TEST_DEVICE").unwrap_or_else(|_| "cpu".into());
    mimlab_engine::device::parse_device(&spec).expect("MIMLAB_TEST_DEVICE")
}

/// A file of tests/fixtures: in the checkout the test was built from, else (a test binary moved to
/// a GPU machine) in the working directory's checkout.
fn fixture(name: &str) -> PathBuf {
    let built = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
    let dir = if built.is_dir() {
        built
    } else {
        PathBuf::from("tests/fixtures")
    };
    dir.join(name)
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

/// max |a - b| / max |b|, on the CPU.
fn rel_err(a: &Tensor, b: &Tensor) -> Result<f32> {
    assert_eq!(a.dims(), b.dims());
    let (a, b) = (&a.to_device(&Device::Cpu)?, &b.to_device(&Device::Cpu)?);
    let d = (a - b)?.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    let s = b.abs()?.flatten_all()?.max(0)?.to_scalar::<f32>()?;
    Ok(d / s)
}

fn check(model: &str, layout: &str, expect: Layout) -> Result<()> {
    let io = read_weights(&fixture(&format!("{model}.io.safetensors")))?;
    let cfg = config_of(&fixture(&format!("{model}.io.safetensors")))?;
    let vm = VarMap::new();
    let vb = seeded_var_builder(&vm, 0, DType::F32, &device());
    let m = SwinV2::new(&cfg, false, SharedRng::new(0), vb)?;
    assert_eq!(
        vm.all_vars().iter().map(|v| v.elem_count()).sum::<usize>(),
        cfg.num_params()
    );
    let weights = read_weights(&fixture(&format!("{model}.{layout}.safetensors")))?;
    let report = load_into_varmap(&vm, weights, &LoadOptions::default())?;
    assert_eq!(report.layout, expect);
    assert_eq!(report.loaded, vm.all_vars().len());
    let x = &io["input"].to_device(&device())?;
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

/// The inputs of scripts/make_dyn_fixtures.py (`64x64`, `100x148`, `68x92`), f16 on disk (exact
/// in f32).
fn dyn_inputs() -> Result<HashMap<String, Tensor>> {
    read_weights(&fixture("swinv2_dyn.inputs.safetensors"))?
        .into_iter()
        .map(|(k, v)| Ok((k, v.to_dtype(DType::F32)?)))
        .collect()
}

/// A model of scripts/make_dyn_fixtures.py (configured at 64 px) with its timm weights, built
/// with `mask_token` (left at its init) and the config changed by `edit`.
fn dyn_model(
    model: &str,
    edit: impl Fn(&mut SwinV2Config),
) -> Result<(VarMap, SwinV2, HashMap<String, Tensor>)> {
    let io_path = fixture(&format!("{model}.io.safetensors"));
    let mut cfg = config_of(&io_path)?;
    assert_eq!(cfg.img_size, 64);
    edit(&mut cfg);
    let vm = VarMap::new();
    let vb = seeded_var_builder(&vm, 0, DType::F32, &device());
    let m = SwinV2::new(&cfg, true, SharedRng::new(0), vb)?;
    let weights = read_weights(&fixture(&format!("{model}.timm.safetensors")))?;
    let opts = LoadOptions {
        allow_missing: vec!["mask_token".into()],
        ..LoadOptions::default()
    };
    let report = load_into_varmap(&vm, weights, &opts)?;
    assert_eq!(report.layout, Layout::Timm);
    assert_eq!(report.loaded + 1, vm.all_vars().len());
    Ok((vm, m, read_weights(&io_path)?))
}

/// Logits, pre-logits, the final map and every stage's map at the configured size (64x64) and
/// at 100x148 and 68x92 (batch 2): timm's numbers to 2e-5 (max |a - b| / max |b|).
fn check_dynamic(model: &str) -> Result<()> {
    let inputs = dyn_inputs()?;
    let (_, m, io) = dyn_model(model, |_| {})?;
    let stages = m.config().num_stages();
    for size in ["64x64", "100x148", "68x92"] {
        let x = &inputs[size].to_device(&device())?;
        let f = m.forward_features(x, None, false)?;
        let (logits, _) = m.forward(x, false)?;
        let mut outs = vec![
            ("logits".to_string(), logits.clone()),
            ("pre_logits".to_string(), m.pre_logits(&f)?),
            ("features".to_string(), f.stages[stages - 1].clone()),
        ];
        for (i, s) in f.stages[..stages - 1].iter().enumerate() {
            outs.push((format!("stage{i}"), s.clone()));
        }
        for (k, v) in &outs {
            let want = &io[&format!("{size}.{k}")];
            let e = rel_err(v, want)?;
            println!("{model} {size} {k} {:?}: rel err {e:.2e}", want.dims());
            assert!(e <= 2e-5, "{model} {size} {k}: relative error {e}");
        }
        // the training forward (no drop path / dropout here) is the same function
        let (t, _) = m.forward(x, true)?;
        assert!(rel_err(&t, &logits)? <= 1e-5, "{model} {size} train");
    }
    Ok(())
}

#[test]
fn dynamic_size_model_a_matches_timm() -> Result<()> {
    check_dynamic("swinv2_dyn_a")
}

#[test]
fn dynamic_size_model_b_matches_timm() -> Result<()> {
    check_dynamic("swinv2_dyn_b")
}

/// Training at a size other than the configured one (68x92 for 64 px, batch 2): with drop path
/// and dropout on and a SimMIM mask over the 17x23 patches, the backward reaches every variable
/// with finite gradients, and the weights of the padded, shifted windows and of the odd patch
/// merging get non-zero ones.
#[test]
fn training_forward_and_backward_at_other_sizes() -> Result<()> {
    let inputs = dyn_inputs()?;
    for model in ["swinv2_dyn_a", "swinv2_dyn_b"] {
        let (vm, m, _) = dyn_model(model, |c| {
            c.drop_path_rate = 0.2;
            c.drop_rate = 0.1;
        })?;
        let x = &inputs["68x92"].to_device(&device())?;
        let mask = Tensor::from_vec(
            (0..2 * 17 * 23)
                .map(|i| (i % 3 == 0) as u8 as f32)
                .collect(),
            (2, 17, 23),
            &device(),
        )?;
        let f = m.forward_features(x, Some(&mask), true)?;
        assert_eq!(f.stages[0].dims(), &[2, m.config().embed_dim, 17, 23]);
        let loss = (m.forward(x, true)?.0.sqr()?.mean_all()? + f.last.sqr()?.mean_all()?)?;
        let grads = loss.backward()?;
        let data = vm.data().lock().unwrap();
        for (k, v) in data.iter() {
            let g = grads
                .get(v.as_tensor())
                .with_context(|| format!("{model}: no gradient for {k}"))?;
            let finite = g
                .flatten_all()?
                .to_vec1::<f32>()?
                .iter()
                .all(|x| x.is_finite());
            assert!(finite, "{model}: {k} has a non-finite gradient");
        }
        for k in [
            "mask_token",
            "layers.0.blocks.1.attn.qkv.weight",
            "layers.0.blocks.1.attn.cpb_mlp.0.weight",
            "layers.0.downsample.reduction.weight",
        ] {
            let g = grads.get(data[k].as_tensor()).context("no gradient")?;
            let n = g.abs()?.sum_all()?.to_scalar::<f32>()?;
            assert!(n > 0.0, "{model}: {k} gets no gradient");
        }
    }
    Ok(())
}

/// Bytes of a tensor (f32 or i64), for bitwise comparisons.
fn bytes(t: &Tensor) -> Result<Vec<u8>> {
    Ok(match t.dtype() {
        DType::I64 => t
            .flatten_all()?
            .to_vec1::<i64>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
        _ => t
            .flatten_all()?
            .to_vec1::<f32>()?
            .iter()
            .flat_map(|v| v.to_le_bytes())
            .collect(),
    })
}

fn sorted_keys(t: &HashMap<String, Tensor>) -> Vec<String> {
    let mut k: Vec<String> = t.keys().cloned().collect();
    k.sort();
    k
}

/// official -> timm gives the timm fixture tensor for tensor (same keys, same bytes); timm ->
/// official -> timm gives it back; timm -> official gives the official fixture's keys, its
/// parameters bit for bit and its buffers (relative_coords_table to 1 ulp of the log2,
/// relative_position_index and attn_mask exactly), for models A and B (3 stages, 7-class head,
/// clamped window, pretrained windows).
#[test]
fn layout_conversions_reproduce_the_fixtures() -> Result<()> {
    for model in ["swinv2_a", "swinv2_b"] {
        let cfg = config_of(&fixture(&format!("{model}.io.safetensors")))?;
        let official = read_weights(&fixture(&format!("{model}.official.safetensors")))?;
        let timm = read_weights(&fixture(&format!("{model}.timm.safetensors")))?;
        let to = |t: &HashMap<String, Tensor>, layout| -> Result<HashMap<String, Tensor>> {
            let (m, _) = remap_to_mimlab(t.clone())?;
            remap_from_mimlab(m, layout, &cfg)
        };
        let same = |a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>| -> Result<()> {
            assert_eq!(sorted_keys(a), sorted_keys(b), "{model}");
            for (k, v) in a {
                assert_eq!(v.dtype(), b[k].dtype(), "{model} {k}");
                assert!(bytes(v)? == bytes(&b[k])?, "{model} {k}: values differ");
            }
            Ok(())
        };
        same(&to(&official, Layout::Timm)?, &timm)?;
        let back = to(&timm, Layout::Official)?;
        same(&to(&back, Layout::Timm)?, &timm)?;
        assert_eq!(sorted_keys(&back), sorted_keys(&official), "{model}");
        for (k, v) in &back {
            let want = &official[k];
            assert_eq!((v.dtype(), v.dims()), (want.dtype(), want.dims()), "{k}");
            if k.ends_with("relative_coords_table") {
                let d = (v - want)?.abs()?.max_all()?.to_scalar::<f32>()?;
                assert!(d <= 1e-6, "{model} {k}: {d}");
            } else {
                assert!(bytes(v)? == bytes(want)?, "{model} {k}: values differ");
            }
        }
        // mimlab layout: the official names without the buffers
        let mimlab = to(&timm, Layout::Mimlab)?;
        assert_eq!(mimlab.len(), timm.len());
        assert_eq!(detect_layout(mimlab.keys()), Layout::Mimlab);
    }
    Ok(())
}
