//! Checkpoint reading, layout remapping, strict loading and atomic saving.
use std::collections::HashMap;

use anyhow::Result;
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use mimlab_engine::init::seeded_var_builder;
use mimlab_engine::rng::SharedRng;
use mimlab_models::checkpoint::*;
use mimlab_models::swin_v2::{SwinV2, SwinV2Config};

fn cfg() -> SwinV2Config {
    SwinV2Config {
        preset: None,
        img_size: 16,
        patch_size: 4,
        in_chans: 3,
        num_classes: 3,
        embed_dim: 8,
        depths: vec![1, 1],
        num_heads: vec![1, 2],
        window_size: 2,
        mlp_ratio: 2.0,
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

fn model(seed: u64, mask_token: bool) -> Result<(VarMap, SwinV2)> {
    let vm = VarMap::new();
    let vb = seeded_var_builder(&vm, seed, DType::F32, &Device::Cpu);
    let m = SwinV2::new(&cfg(), mask_token, SharedRng::new(0), vb)?;
    Ok((vm, m))
}

fn values(vm: &VarMap) -> Result<HashMap<String, Vec<f32>>> {
    let data = vm.data().lock().unwrap();
    data.iter()
        .map(|(k, v)| Ok((k.clone(), v.flatten_all()?.to_vec1::<f32>()?)))
        .collect()
}

fn tensors(vm: &VarMap) -> HashMap<String, Tensor> {
    let data = vm.data().lock().unwrap();
    data.iter()
        .map(|(k, v)| (k.clone(), v.as_tensor().copy().unwrap()))
        .collect()
}

#[test]
fn load_save_load_round_trip_is_bit_equal() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (a, _) = model(1, false)?;
    let path = dir.path().join("sub/a.safetensors");
    save_varmap(&a, &path)?;
    assert!(!dir.path().join("sub/a.safetensors.tmp").exists());
    let (b, _) = model(2, false)?;
    assert_ne!(values(&a)?, values(&b)?);
    let r = load_into_varmap(&b, read_weights(&path)?, &LoadOptions::default())?;
    assert_eq!(r.layout, Layout::Mimlab);
    assert_eq!(r.loaded, a.all_vars().len());
    assert_eq!(values(&a)?, values(&b)?);
    let path2 = dir.path().join("b.safetensors");
    save_varmap(&b, &path2)?;
    let (c, _) = model(3, false)?;
    load_into_varmap(&c, read_weights(&path2)?, &LoadOptions::default())?;
    assert_eq!(values(&a)?, values(&c)?);
    Ok(())
}

#[test]
fn sharded_index_is_read() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (a, _) = model(1, false)?;
    let all = tensors(&a);
    let (mut s1, mut s2) = (HashMap::new(), HashMap::new());
    let mut map = serde_json::Map::new();
    for (i, (k, v)) in all.iter().enumerate() {
        let f = if i % 2 == 0 {
            "m-1.safetensors"
        } else {
            "m-2.safetensors"
        };
        if i % 2 == 0 {
            s1.insert(k.clone(), v.clone())
        } else {
            s2.insert(k.clone(), v.clone())
        };
        map.insert(k.clone(), f.into());
    }
    candle_core::safetensors::save(&s1, dir.path().join("m-1.safetensors"))?;
    candle_core::safetensors::save(&s2, dir.path().join("m-2.safetensors"))?;
    let idx = dir.path().join("m.safetensors.index.json");
    std::fs::write(
        &idx,
        serde_json::json!({"metadata": {}, "weight_map": map}).to_string(),
    )?;
    let got = read_weights(&idx)?;
    assert_eq!(got.len(), all.len());
    let (b, _) = model(2, false)?;
    load_into_varmap(&b, got, &LoadOptions::default())?;
    assert_eq!(values(&a)?, values(&b)?);
    // a missing shard names the file
    std::fs::remove_file(dir.path().join("m-2.safetensors"))?;
    let e = format!("{:#}", read_weights(&idx).unwrap_err());
    assert!(e.contains("m-2.safetensors"), "{e}");
    Ok(())
}

#[test]
fn load_errors_name_the_tensors() -> Result<()> {
    let (a, _) = model(1, false)?;
    let opts = LoadOptions::default();
    // missing
    let mut t = tensors(&a);
    t.remove("layers.0.blocks.0.attn.q_bias");
    let (b, _) = model(2, false)?;
    let before = values(&b)?;
    let e = format!("{:#}", load_into_varmap(&b, t, &opts).unwrap_err());
    assert!(
        e.contains("missing") && e.contains("`layers.0.blocks.0.attn.q_bias`"),
        "{e}"
    );
    assert_eq!(values(&b)?, before, "a failed load writes nothing");
    // unexpected
    let mut t = tensors(&a);
    t.insert(
        "layers.0.blocks.0.attn.bogus".into(),
        Tensor::zeros(3, DType::F32, &Device::Cpu)?,
    );
    let e = format!("{:#}", load_into_varmap(&b, t, &opts).unwrap_err());
    assert!(
        e.contains("unexpected") && e.contains("`layers.0.blocks.0.attn.bogus`"),
        "{e}"
    );
    // shape mismatch: both shapes
    let mut t = tensors(&a);
    t.insert(
        "head.weight".into(),
        Tensor::zeros((5, 16), DType::F32, &Device::Cpu)?,
    );
    let e = format!("{:#}", load_into_varmap(&b, t, &opts).unwrap_err());
    assert!(
        e.contains("head.weight: checkpoint [5, 16] vs model [3, 16]"),
        "{e}"
    );
    // the same with head. allowed to stay at init is still a mismatch error, but a dropped head is fine
    let mut t = tensors(&a);
    t.remove("head.weight");
    t.remove("head.bias");
    let r = load_into_varmap(
        &b,
        t,
        &LoadOptions {
            allow_missing: vec!["head.".into()],
            ..opts.clone()
        },
    )?;
    assert_eq!(
        r.missing_allowed,
        vec!["head.bias".to_string(), "head.weight".to_string()]
    );
    Ok(())
}

#[test]
fn simmim_encoder_prefix_and_official_buffers() -> Result<()> {
    // a SimMIM-style checkpoint: encoder.* (official keys + buffers), decoder.*, encoder.mask_token
    let (a, _) = model(1, true)?;
    let mut t: HashMap<String, Tensor> = tensors(&a)
        .into_iter()
        .map(|(k, v)| (format!("encoder.{k}"), v))
        .collect();
    let z = Tensor::zeros(4, DType::F32, &Device::Cpu)?;
    t.insert(
        "encoder.layers.0.blocks.0.attn.relative_position_index".into(),
        z.clone(),
    );
    t.insert(
        "encoder.layers.1.blocks.0.attn.relative_coords_table".into(),
        z.clone(),
    );
    t.insert("decoder.0.weight".into(), z.clone());
    let (b, _) = model(2, false)?;
    let opts = LoadOptions {
        prefix: "encoder.".into(),
        allow_missing: vec![],
        ignore_unexpected: vec!["decoder.".into(), "mask_token".into()],
    };
    let r = load_into_varmap(&b, t, &opts)?;
    assert_eq!(
        r.ignored,
        vec![
            "decoder.0.weight".to_string(),
            "encoder.mask_token".to_string()
        ]
    );
    assert_eq!(r.layout, Layout::Official);
    let va = values(&a)?;
    for (k, v) in values(&b)? {
        assert_eq!(va[&k], v, "{k}");
    }
    Ok(())
}

#[test]
fn checkpoint_keys_come_from_the_header_or_the_index() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let (a, _) = model(1, true)?;
    let mut want: Vec<String> = tensors(&a).into_keys().collect();
    want.sort();
    let path = dir.path().join("a.safetensors");
    save_varmap(&a, &path)?;
    assert_eq!(checkpoint_keys(&path)?, want);
    let idx = dir.path().join("a.safetensors.index.json");
    let map: serde_json::Map<String, serde_json::Value> = want
        .iter()
        .map(|k| (k.clone(), "a.safetensors".into()))
        .collect();
    std::fs::write(&idx, serde_json::json!({ "weight_map": map }).to_string())?;
    assert_eq!(checkpoint_keys(&idx)?, want);
    std::fs::write(dir.path().join("bad.safetensors"), [1u8, 0, 0])?;
    let e = format!(
        "{:#}",
        checkpoint_keys(&dir.path().join("bad.safetensors")).unwrap_err()
    );
    assert!(e.contains("bad.safetensors"), "{e}");
    Ok(())
}

/// A float weight arriving as integers (I64 / U8, e.g. a quantized or mislabeled export) is an
/// error naming the tensor and both dtypes, and nothing is written; a float of another width
/// (F16) still loads, converted.
#[test]
fn an_integer_tensor_for_a_float_weight_is_an_error_not_a_cast() -> Result<()> {
    let (a, _) = model(1, false)?;
    let (b, _) = model(2, false)?;
    let before = values(&b)?;
    for dtype in [DType::I64, DType::U8] {
        let mut t = tensors(&a);
        let k = "layers.0.blocks.0.attn.q_bias";
        t.insert(k.into(), Tensor::ones(8, dtype, &Device::Cpu)?);
        let e = format!(
            "{:#}",
            load_into_varmap(&b, t, &LoadOptions::default()).unwrap_err()
        );
        assert!(
            e.contains(&format!(
                "1 dtype mismatch `{k}` ({k}: checkpoint {dtype:?} vs model F32; not cast)"
            )),
            "{e}"
        );
        assert_eq!(values(&b)?, before, "a failed load writes nothing");
    }
    let mut t = tensors(&a);
    let k = "layers.0.blocks.0.attn.v_bias";
    let half = t[k].to_dtype(DType::F16)?;
    t.insert(k.into(), half.clone());
    load_into_varmap(&b, t, &LoadOptions::default())?;
    assert_eq!(values(&b)?[k], half.to_dtype(DType::F32)?.to_vec1::<f32>()?);
    Ok(())
}
