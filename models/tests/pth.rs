//! PyTorch checkpoints (scripts/make_pth_fixtures.py): the zip-format `{'model': sd}` `.pth` of
//! the official releases and a legacy-format plain state dict (`pytorch_model.bin` style) read to
//! exactly the tensors of their safetensors twins, and the `.pth` gives the fixture outputs.
use std::collections::HashMap;
use std::io::Write;
use std::path::PathBuf;

use anyhow::{Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use mimlab_engine::init::seeded_var_builder;
use mimlab_engine::rng::SharedRng;
use mimlab_models::checkpoint::{
    checkpoint_keys, load_into_varmap, read_weights, weights_format, weights_metadata, Layout,
    LoadOptions, WeightsFormat,
};
use mimlab_models::swin_v2::{SwinV2, SwinV2Config};

fn fixture(name: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
        .join("../tests/fixtures")
        .join(name)
}

/// Same names, dtypes, shapes and bytes.
fn assert_bitwise_equal(a: &HashMap<String, Tensor>, b: &HashMap<String, Tensor>) -> Result<()> {
    let mut ka: Vec<&String> = a.keys().collect();
    let mut kb: Vec<&String> = b.keys().collect();
    ka.sort();
    kb.sort();
    assert_eq!(ka, kb);
    for (k, x) in a {
        let y = &b[k];
        assert_eq!((x.dtype(), x.dims()), (y.dtype(), y.dims()), "{k}");
        let bytes = |t: &Tensor| -> Result<Vec<u8>> {
            Ok(match t.dtype() {
                DType::I64 => t
                    .flatten_all()?
                    .to_vec1::<i64>()?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
                _ => t
                    .to_dtype(DType::F32)?
                    .flatten_all()?
                    .to_vec1::<f32>()?
                    .iter()
                    .flat_map(|v| v.to_le_bytes())
                    .collect(),
            })
        };
        assert!(bytes(x)? == bytes(y)?, "{k}: values differ");
    }
    Ok(())
}

#[test]
fn official_pth_holds_exactly_its_safetensors_twin() -> Result<()> {
    let pth = fixture("swinv2_a.official.pth");
    let twin = fixture("swinv2_a.official.safetensors");
    assert_eq!(weights_format(&pth)?, WeightsFormat::TorchZip);
    assert_eq!(weights_format(&twin)?, WeightsFormat::Safetensors);
    let a = read_weights(&pth)?;
    let b = read_weights(&twin)?;
    assert_eq!(
        a.len(),
        86,
        "the state dict under `model`, not epoch/config"
    );
    assert_eq!(
        a["layers.0.blocks.0.attn.relative_position_index"].dtype(),
        DType::I64
    );
    assert_bitwise_equal(&a, &b)?;
    assert_eq!(checkpoint_keys(&pth)?, checkpoint_keys(&twin)?);
    assert!(weights_metadata(&pth)?.is_empty());
    Ok(())
}

#[test]
fn legacy_bin_holds_exactly_its_safetensors_twin() -> Result<()> {
    let bin = fixture("swinv2_dyn_a.timm.legacy.bin");
    assert_eq!(weights_format(&bin)?, WeightsFormat::TorchLegacy);
    let a = read_weights(&bin)?;
    let b = read_weights(&fixture("swinv2_dyn_a.timm.safetensors"))?;
    assert_eq!(a.len(), 79);
    assert_bitwise_equal(&a, &b)?;
    let mut keys: Vec<String> = b.into_keys().collect();
    keys.sort();
    assert_eq!(checkpoint_keys(&bin)?, keys);
    Ok(())
}

/// The `.pth` loads (official layout detected, every variable set) and gives exactly the
/// outputs of its safetensors twin, which match PyTorch's stored ones.
#[test]
fn official_pth_gives_the_outputs_of_its_twin() -> Result<()> {
    let io_path = fixture("swinv2_a.io.safetensors");
    let json = weights_metadata(&io_path)?
        .remove("config")
        .context("no config")?;
    let cfg: SwinV2Config = serde_json::from_str(&json)?;
    let io = read_weights(&io_path)?;
    let run = |file: &str| -> Result<Vec<f32>> {
        let vm = VarMap::new();
        let vb = seeded_var_builder(&vm, 0, DType::F32, &Device::Cpu);
        let m = SwinV2::new(&cfg, false, SharedRng::new(0), vb)?;
        let r = load_into_varmap(&vm, read_weights(&fixture(file))?, &LoadOptions::default())?;
        assert_eq!(r.layout, Layout::Official);
        assert_eq!(r.loaded, vm.all_vars().len());
        let f = m.forward_features(&io["input"], None, false)?;
        Ok(f.stages.last().unwrap().flatten_all()?.to_vec1()?)
    };
    let from_pth = run("swinv2_a.official.pth")?;
    let from_twin = run("swinv2_a.official.safetensors")?;
    assert_eq!(from_pth, from_twin, "identical outputs");
    let want: Vec<f32> = io["official.features"].flatten_all()?.to_vec1()?;
    let scale = want.iter().fold(0f32, |m, v| m.max(v.abs()));
    let err = from_pth
        .iter()
        .zip(&want)
        .fold(0f32, |m, (a, b)| m.max((a - b).abs()));
    assert!(err / scale <= 1e-4, "relative error {}", err / scale);
    Ok(())
}

/// A zip-format checkpoint whose pickle is `{'epoch': 3, 'optimizer': {}}`: the error names the
/// file, where a state dict was looked for and the keys found.
#[test]
fn a_pth_without_tensors_names_the_file_and_its_keys() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let p = dir.path().join("ckpt.pth");
    // pickle protocol 2: PROTO 2, EMPTY_DICT, MARK, 'epoch', BININT1 3, 'optimizer',
    // EMPTY_DICT, SETITEMS, STOP
    let mut pkl = vec![0x80, 0x02, b'}', b'('];
    for (s, v) in [("epoch", &[b'K', 3][..]), ("optimizer", &[b'}'][..])] {
        pkl.push(b'X');
        pkl.extend((s.len() as u32).to_le_bytes());
        pkl.extend(s.as_bytes());
        pkl.extend(v);
    }
    pkl.extend([b'u', b'.']);
    let mut zip = zip::ZipWriter::new(std::fs::File::create(&p)?);
    let opts =
        zip::write::SimpleFileOptions::default().compression_method(zip::CompressionMethod::Stored);
    zip.start_file("ckpt/data.pkl", opts)?;
    zip.write_all(&pkl)?;
    zip.finish()?;
    assert_eq!(weights_format(&p)?, WeightsFormat::TorchZip);
    let e = format!("{:#}", read_weights(&p).unwrap_err());
    assert_eq!(
        e,
        format!(
            "{}: no tensors under `model`, `state_dict`, `module` or at the top level of the \
             PyTorch checkpoint (top-level keys: `epoch`, `optimizer`)",
            p.display()
        )
    );
    let e = format!("{:#}", checkpoint_keys(&p).unwrap_err());
    assert!(e.contains("top-level keys: `epoch`, `optimizer`"), "{e}");
    Ok(())
}
