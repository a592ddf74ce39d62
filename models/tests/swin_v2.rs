//! Swin-V2 building blocks, presets and model invariants (architecture.md 1).
use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::{VarBuilder, VarMap};
use mimlab_engine::init::seeded_var_builder;
use mimlab_engine::rng::SharedRng;
use mimlab_models::moe::MoeAux;
use mimlab_models::swin_v2::*;

fn build(cfg: &SwinV2Config, seed: u64) -> Result<(VarMap, SwinV2)> {
    let vm = VarMap::new();
    let vb = seeded_var_builder(&vm, seed, DType::F32, &Device::Cpu);
    let m = SwinV2::new(cfg, true, SharedRng::new(seed), vb)?;
    Ok((vm, m))
}

fn small() -> SwinV2Config {
    SwinV2Config {
        preset: None,
        img_size: 32,
        patch_size: 4,
        in_chans: 3,
        num_classes: 5,
        embed_dim: 8,
        depths: vec![2, 2],
        num_heads: vec![1, 2],
        window_size: 4,
        mlp_ratio: 4.0,
        qkv_bias: true,
        drop_rate: 0.0,
        attn_drop_rate: 0.0,
        drop_path_rate: 0.0,
        pretrained_window_sizes: vec![0, 0],
        patch_norm: true,
        moe: Default::default(),
        shared_cpb: false,
    }
}

fn input(b: usize, h: usize, w: usize, seed: u64) -> Result<Tensor> {
    let v: Vec<f32> = (0..b * 3 * h * w)
        .map(|i| ((i as u64 * 2654435761 + seed) % 1000) as f32 / 500.0 - 1.0)
        .collect();
    Ok(Tensor::from_vec(v, (b, 3, h, w), &Device::Cpu)?)
}

/// Sets every variable whose name contains `pat` to `value`.
fn set_all(vm: &VarMap, pat: &str, value: f32) -> Result<()> {
    for (k, v) in vm.data().lock().unwrap().iter() {
        if k.contains(pat) {
            v.set(&Tensor::full(value, v.shape(), &Device::Cpu)?)?;
        }
    }
    Ok(())
}

#[test]
fn window_partition_reverse_round_trip() -> Result<()> {
    let x = Tensor::arange(0f32, (2 * 8 * 12 * 3) as f32, &Device::Cpu)?.reshape((2, 8, 12, 3))?;
    let w = window_partition(&x, 4)?;
    assert_eq!(w.dims(), &[2 * 2 * 3, 4, 4, 3]);
    // window 1 of image 0 = rows 0..4, cols 4..8 (index = b*nW + row*(W/ws) + col)
    let got = w.get(1)?.get(0)?.get(0)?.to_vec1::<f32>()?;
    assert_eq!(got, x.get(0)?.get(0)?.get(4)?.to_vec1::<f32>()?);
    let back = window_reverse(&w, 4, 8, 12)?;
    assert_eq!(
        back.flatten_all()?.to_vec1::<f32>()?,
        x.flatten_all()?.to_vec1::<f32>()?
    );
    Ok(())
}

fn zero_counts(h: usize, ws: usize, s: usize) -> Result<Vec<usize>> {
    let m = shifted_window_mask(h, h, ws, s, &Device::Cpu)?;
    let v = m.to_vec3::<f32>()?;
    for w in &v {
        assert!(w.iter().flatten().all(|&x| x == 0.0 || x == -100.0));
    }
    Ok(v.iter()
        .map(|w| w.iter().flatten().filter(|&&x| x == 0.0).count())
        .collect())
}

#[test]
fn shifted_window_mask_matches_reference_counts() -> Result<()> {
    // architecture.md 1.6 test vectors
    assert_eq!(zero_counts(8, 4, 2)?, vec![256, 128, 128, 64]);
    let c = zero_counts(64, 8, 4)?;
    assert_eq!(c.len(), 64);
    for (i, &n) in c.iter().enumerate() {
        let (r, col) = (i / 8, i % 8);
        let want = match (r == 7, col == 7) {
            (false, false) => 4096,
            (true, true) => 1024,
            _ => 2048,
        };
        assert_eq!(n, want, "window {i}");
    }
    Ok(())
}

#[test]
fn relative_position_index_reference_values() {
    let i2 = relative_position_index(2);
    assert_eq!(i2, vec![4, 3, 1, 0, 5, 4, 2, 1, 7, 6, 4, 3, 8, 7, 5, 4]);
    // window 3 by hand: (dh + 2) * 5 + (dw + 2)
    let i3 = relative_position_index(3);
    assert_eq!(&i3[0..9], &[12, 11, 10, 7, 6, 5, 2, 1, 0]);
    assert_eq!(&i3[36..45], &[18, 17, 16, 13, 12, 11, 8, 7, 6]);
    assert_eq!(&i3[72..81], &[24, 23, 22, 19, 18, 17, 14, 13, 12]);
}

/// t(d) for d = 0.. from the table's dh axis (dw = 0).
fn coords_along_h(ws: usize, pws: usize) -> Vec<f32> {
    let t = relative_coords_table(ws, pws);
    let side = 2 * ws - 1;
    (0..ws)
        .map(|d| t[((d + ws - 1) * side + (ws - 1)) * 2])
        .collect()
}

fn close(a: &[f32], b: &[f32]) {
    assert_eq!(a.len(), b.len());
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() < 1e-5, "{a:?} vs {b:?}");
    }
}

#[test]
fn relative_coords_table_reference_values() {
    // architecture.md 1.5
    close(
        &coords_along_h(8, 0),
        &[
            0.0, 0.36651, 0.57207, 0.71561, 0.82602, 0.91574, 0.99133, 1.05664,
        ],
    );
    let w12 = coords_along_h(12, 0);
    close(&w12[..3], &[0.0, 0.26283, 0.43182]);
    close(&w12[11..], &[1.05664]);
    let w16 = coords_along_h(16, 12);
    close(&w16[..12], &w12);
    close(&w16[15..], &[1.19133]);
    close(&coords_along_h(24, 12)[23..], &[1.38263]);
    close(
        &coords_along_h(7, 6),
        &[0.0, 0.4595, 0.69013, 0.84535, 0.96251, 1.05664, 1.13533],
    );
    // symmetric and both axes: entry (dh, dw) = (t(dh), t(dw))
    let t = relative_coords_table(8, 0);
    assert_eq!(t.len(), 15 * 15 * 2);
    close(&[t[0], t[1]], &[-1.05664, -1.05664]); // corner (dh, dw) = (-7, -7)
    close(&[t[28], t[29]], &[-1.05664, 1.05664]); // entry 14 = (-7, +7)
}

#[test]
fn logit_scale_is_clamped_at_ln_100() -> Result<()> {
    let cfg = small();
    let x = input(1, 32, 32, 1)?;
    let run = |ls: f32| -> Result<Vec<f32>> {
        let (vm, m) = build(&cfg, 5)?;
        set_all(&vm, "norm1.weight", 1.0)?; // make the attention branch visible
        set_all(&vm, "logit_scale", ls)?;
        Ok(m.forward(&x, false)?.0.flatten_all()?.to_vec1::<f32>()?)
    };
    let at_clamp = run(100f32.ln())?;
    assert_eq!(
        run(10.0)?,
        at_clamp,
        "logit_scale 10 must give scale exactly 100"
    );
    assert_ne!(run(4.0)?, at_clamp);
    Ok(())
}

#[test]
fn residual_post_norm_init_makes_blocks_identity() -> Result<()> {
    // norm1/norm2 start at zero: every block is the identity, so stage 0 = normalized patch embed
    let cfg = small();
    let (vm, m) = build(&cfg, 1)?;
    let data = vm.data().lock().unwrap();
    for (k, v) in data.iter() {
        let vals = v.flatten_all()?.to_vec1::<f32>()?;
        if k.contains("norm1.")
            || k.contains("norm2.")
            || k.ends_with("_bias")
            || (k.ends_with(".bias") && !k.starts_with("patch_embed.proj"))
        {
            assert!(vals.iter().all(|&x| x == 0.0), "{k} must start at 0");
        }
        if k.ends_with("logit_scale") {
            assert!(vals.iter().all(|&x| (x - 10f32.ln()).abs() < 1e-7));
        }
        if k == "patch_embed.proj.weight" {
            let bound = 1.0 / (48f32).sqrt();
            assert!(vals.iter().all(|&x| x.abs() <= bound));
        }
    }
    drop(data);
    let x = input(1, 32, 32, 2)?;
    let f = m.forward_features(&x, None, false)?;
    let s0 = f.stages[0].permute((0, 2, 3, 1))?; // NHWC
    let data = vm.data().lock().unwrap();
    let w = data["patch_embed.proj.weight"]
        .as_tensor()
        .reshape((8, 48))?;
    let b = data["patch_embed.proj.bias"].as_tensor();
    let cols = x
        .reshape((1, 3, 8, 4, 8, 4))?
        .permute((0, 2, 4, 1, 3, 5))?
        .reshape((64, 48))?;
    let pe = cols.matmul(&w.t()?)?.broadcast_add(b)?;
    let pe = candle_nn::ops::layer_norm_slow(
        &pe,
        &Tensor::ones(8, DType::F32, &Device::Cpu)?,
        &Tensor::zeros(8, DType::F32, &Device::Cpu)?,
        1e-5,
    )?;
    let d = (s0.reshape((64, 8))? - pe)?
        .abs()?
        .max_all()?
        .to_scalar::<f32>()?;
    assert!(d < 1e-5, "{d}");
    Ok(())
}

#[test]
fn mask_token_replaces_masked_patches() -> Result<()> {
    let cfg = small();
    let (vm, m) = build(&cfg, 3)?;
    set_all(&vm, "norm1.weight", 1.0)?;
    set_all(&vm, "norm2.weight", 1.0)?;
    let (a, b) = (input(2, 32, 32, 1)?, input(2, 32, 32, 7)?);
    let zeros = Tensor::zeros((2, 8, 8), DType::F32, &Device::Cpu)?;
    let ones = Tensor::ones((2, 8, 8), DType::F32, &Device::Cpu)?;
    let plain = m
        .forward_features(&a, None, false)?
        .last
        .flatten_all()?
        .to_vec1::<f32>()?;
    let unmasked = m
        .forward_features(&a, Some(&zeros), false)?
        .last
        .flatten_all()?
        .to_vec1::<f32>()?;
    assert_eq!(plain, unmasked);
    // everything masked: the output no longer depends on the image
    let fa = m.forward_features(&a, Some(&ones), false)?.last;
    let fb = m.forward_features(&b, Some(&ones), false)?.last;
    assert!((fa - fb)?.abs()?.max_all()?.to_scalar::<f32>()? < 1e-6);
    // a wrong-shaped mask is an error naming the expected shape
    let bad = Tensor::zeros((2, 4, 4), DType::F32, &Device::Cpu)?;
    let e = format!(
        "{:#}",
        m.forward_features(&a, Some(&bad), false).unwrap_err()
    );
    assert!(e.contains("expected [2, 8, 8]"), "{e}");
    Ok(())
}

#[test]
fn drop_path_is_seeded_and_train_only() -> Result<()> {
    let mut cfg = small();
    cfg.drop_path_rate = 0.5;
    let (vm, m) = build(&cfg, 3)?;
    set_all(&vm, "norm1.weight", 1.0)?;
    set_all(&vm, "norm2.weight", 1.0)?;
    let x = input(4, 32, 32, 1)?;
    let rng = SharedRng::new(0);
    let m = {
        drop(m);
        let vb = VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu);
        SwinV2::new(&cfg, true, rng.clone(), vb)?
    };
    let ev = |(t, _): (Tensor, MoeAux)| t.flatten_all().unwrap().to_vec1::<f32>().unwrap();
    assert_eq!(ev(m.forward(&x, false)?), ev(m.forward(&x, false)?));
    rng.reseed(42);
    let t1 = ev(m.forward(&x, true)?);
    rng.reseed(42);
    let t2 = ev(m.forward(&x, true)?);
    assert_eq!(t1, t2);
    assert_ne!(t1, ev(m.forward(&x, true)?));
    assert_ne!(t1, ev(m.forward(&x, false)?));
    Ok(())
}

#[test]
fn preset_output_shapes_at_two_sizes() -> Result<()> {
    for (name, sizes) in [
        ("swinv2_nano", [64, 128]),
        ("swinv2_micro", [128, 64]),
        ("swinv2_tiny_window8_256", [64, 128]),
        ("swinv2_tiny_window16_256", [64, 128]),
    ] {
        let cfg = SwinV2Config::preset(name)?;
        let vb = VarBuilder::zeros(DType::F32, &Device::Cpu);
        let m = SwinV2::new(&cfg, false, SharedRng::new(0), vb)?;
        for s in sizes {
            let f = m.forward_features(
                &Tensor::zeros((1, 3, s, s), DType::F32, &Device::Cpu)?,
                None,
                false,
            )?;
            for (i, st) in f.stages.iter().enumerate() {
                let r = s / (4 << i);
                assert_eq!(
                    st.dims(),
                    &[1, cfg.embed_dim << i, r, r],
                    "{name} @{s} stage {i}"
                );
            }
            let r = s / cfg.out_stride();
            assert_eq!(f.last.dims(), &[1, r * r, cfg.num_features()]);
            let (logits, _) = m.forward(
                &Tensor::zeros((1, 3, s, s), DType::F32, &Device::Cpu)?,
                false,
            )?;
            assert_eq!(logits.dims(), &[1, cfg.num_classes]);
        }
    }
    // the big presets: config checks at two sizes each (their forward is too slow for a test)
    for name in PRESETS {
        let cfg = SwinV2Config::preset(name)?;
        cfg.validate()?;
        let small = if cfg.window_size % 12 == 0 { 96 } else { 64 };
        cfg.check_resolution(small, small)?;
        cfg.check_resolution(cfg.img_size, cfg.img_size)?;
        assert_eq!(cfg.out_stride(), 32);
    }
    // non-square input
    let cfg = small();
    let (_, m) = build(&cfg, 0)?;
    let f = m.forward_features(&input(1, 32, 64, 0)?, None, false)?;
    assert_eq!(f.stages[1].dims(), &[1, 16, 4, 8]);
    Ok(())
}

#[test]
fn parameter_counts_match_the_reference_table() -> Result<()> {
    // architecture.md 1.2 [computed]
    let tiny = SwinV2Config::preset("swinv2_tiny_window8_256")?;
    assert_eq!(tiny.num_params(), 28_347_154);
    let vm = VarMap::new();
    let _m = SwinV2::new(
        &tiny,
        false,
        SharedRng::new(0),
        VarBuilder::from_varmap(&vm, DType::F32, &Device::Cpu),
    )?;
    let built: usize = vm.all_vars().iter().map(|v| v.elem_count()).sum();
    assert_eq!(built, 28_347_154);
    let p = |n: &str, classes: usize| -> Result<usize> {
        let mut c = SwinV2Config::preset(n)?;
        c.num_classes = classes;
        Ok(c.num_params())
    };
    assert_eq!(p("swinv2_small_window8_256", 1000)?, 49_728_418);
    assert_eq!(p("swinv2_base_window8_256", 1000)?, 87_918_816);
    assert_eq!(p("swinv2_base_window12_192", 21841)?, 109_280_841);
    assert_eq!(
        SwinV2Config::preset("swinv2_base_window12_192")?.num_params(),
        109_280_841
    );
    assert_eq!(p("swinv2_large_window12_192", 1000)?, 196_739_932);
    assert_eq!(p("swinv2_tiny_window8_256", 21841)?, 44_373_883);
    // the analytic count equals the built one for a model with no qkv bias / patch norm too
    let mut c = small();
    c.qkv_bias = false;
    c.patch_norm = false;
    c.mlp_ratio = 2.5;
    let (vm, _) = build(&c, 0)?;
    let built: usize = vm.all_vars().iter().map(|v| v.elem_count()).sum();
    assert_eq!(built, c.num_params() + c.embed_dim, "+ mask_token");
    Ok(())
}

#[test]
fn flops_match_the_official_readme() -> Result<()> {
    let g = |n: &str| -> Result<f64> {
        Ok((SwinV2Config::preset(n)?.flops() as f64 / 1e8).round() / 10.0)
    };
    assert_eq!(g("swinv2_tiny_window8_256")?, 5.9);
    assert_eq!(g("swinv2_tiny_window16_256")?, 6.6);
    assert_eq!(g("swinv2_base_window8_256")?, 20.3);
    assert_eq!(g("swinv2_base_window16_256")?, 21.8);
    Ok(())
}

/// `mimlab model list`'s numbers against timm's model card of swinv2_tiny_window8_256 (Params
/// (M) 28.3, GMACs 5.96): the parameters exactly as timm 1.0.31 counts them
/// (`sum(p.numel() for p in create_model(...).parameters())` = 28,347,154, 1000-class head), the
/// multiply-adds within 2%.
#[test]
fn tiny_window8_256_matches_the_timm_model_card() -> Result<()> {
    let tiny = SwinV2Config::preset("swinv2_tiny_window8_256")?;
    assert_eq!(tiny.num_classes, 1000);
    assert_eq!(tiny.num_params(), 28_347_154);
    assert_eq!((tiny.num_params() as f64 / 1e5).round() / 10.0, 28.3);
    let macs = tiny.macs() as f64;
    let rel = (macs / 5.96e9 - 1.0).abs();
    assert!(
        rel < 0.02,
        "{macs} MACs vs timm's 5.96 G: {:.2}%",
        rel * 100.0
    );
    // hand count (256 px, 64x64 patches of 4): blocks 5,674,893,312 + patch embed 18,874,368 +
    // merging 226,492,416 + CPB MLP 18,662,400 + head 768,000
    assert_eq!(tiny.macs(), 5_939_690_496);
    Ok(())
}

#[test]
fn config_errors_name_the_key() -> Result<()> {
    let e = format!("{:#}", SwinV2Config::preset("swinv2_huge").unwrap_err());
    assert!(
        e.contains("swinv2_nano") && e.contains("swinv2_base_window12_192"),
        "{e}"
    );
    let mut c = small();
    c.window_size = 3;
    let e = format!("{:#}", c.validate().unwrap_err());
    assert!(e.contains("model.window_size"), "{e}");
    let mut c = small();
    c.num_heads = vec![3, 2];
    assert!(format!("{:#}", c.validate().unwrap_err()).contains("model.num_heads[0]"));
    let mut c = small();
    c.depths = vec![2, 2, 2];
    assert!(format!("{:#}", c.validate().unwrap_err()).contains("model.num_heads"));
    let mut c = small();
    c.img_size = 30;
    assert!(format!("{:#}", c.validate().unwrap_err()).contains("model.img_size"));
    let (_, m) = build(&small(), 0)?;
    // any multiple of the patch size runs (8x9 patches: windows padded, odd merge padded) ...
    let f = m.forward_features(&input(1, 32, 36, 0)?, None, false)?;
    assert_eq!(f.stages[1].dims(), &[1, 16, 4, 5]);
    // ... and any other size is an error naming it and the patch size
    let e = format!(
        "{:#}",
        m.forward_features(&input(1, 32, 38, 0)?, None, false)
            .unwrap_err()
    );
    assert!(
        e.contains("image 32x38 is not a multiple of the patch size 4"),
        "{e}"
    );
    Ok(())
}
