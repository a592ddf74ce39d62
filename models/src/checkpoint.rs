//! Swin-V2 checkpoint layouts (architecture.md 2): reading weights files (safetensors single or
//! sharded, PyTorch `.pth` / `.pt` / `.bin`; the format told by content in [`weights_format`]),
//! detecting and remapping official / timm keys to mimlab's (= official) names and back,
//! loading into a `VarMap` with strict checks, and atomic saving.
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{DType, Device, Tensor};
use candle_nn::VarMap;
use mimlab_engine::fsutil::{ensure_parent, write_atomic_with};
pub use mimlab_engine::trainer::checkpoint::LoadOptions;
use mimlab_engine::trainer::checkpoint::{load_into_varmap_renamed, save_tensors, varmap_tensors};

use crate::swin_v2::{
    relative_coords_table, relative_position_index, shifted_window_mask, SwinV2Config,
};

pub mod pth;

/// Key layout of a Swin-V2 state dict.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Layout {
    /// microsoft/Swin-Transformer: downsample at the end of stage i, `head.*`, persistent buffers.
    Official,
    /// timm: downsample at the start of stage i+1, `head.fc.*`, no buffers.
    Timm,
    /// mimlab: official names without the re-derived buffers.
    Mimlab,
}

/// How a weights file is stored.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WeightsFormat {
    /// One `*.safetensors` file.
    Safetensors,
    /// A `*.safetensors.index.json` naming shards (HF style `{"weight_map": {tensor: file}}`).
    SafetensorsIndex,
    /// `torch.save` zip archive (torch >= 1.6; `.pth`, `.pt`, HF `pytorch_model.bin`).
    TorchZip,
    /// `torch.save` legacy stream (`_use_new_zipfile_serialization=False`).
    TorchLegacy,
}

/// The format of the weights file `path`, told by its first bytes: zip magic `PK\x03\x04` ->
/// PyTorch zip, torch's pickled magic number -> PyTorch legacy, anything else safetensors
/// (checked when read); a name ending in `.json` is a sharded safetensors index. The one place
/// that tells formats apart: every reader goes through it.
pub fn weights_format(path: &Path) -> Result<WeightsFormat> {
    use std::io::Read;
    if path.to_string_lossy().ends_with(".json") {
        return Ok(WeightsFormat::SafetensorsIndex);
    }
    let mut head = Vec::with_capacity(pth::LEGACY_MAGIC.len());
    std::fs::File::open(path)
        .with_context(|| format!("reading weights {}", path.display()))?
        .take(pth::LEGACY_MAGIC.len() as u64)
        .read_to_end(&mut head)
        .with_context(|| format!("reading weights {}", path.display()))?;
    Ok(if head.starts_with(b"PK\x03\x04") {
        WeightsFormat::TorchZip
    } else if head == pth::LEGACY_MAGIC {
        WeightsFormat::TorchLegacy
    } else {
        WeightsFormat::Safetensors
    })
}

/// Reads a weights file onto the CPU: a `*.safetensors` file, every shard named by a
/// `*.safetensors.index.json`, or the state dict of a PyTorch checkpoint (under `model`,
/// `state_dict`, `module` or at the top level; [`pth`]). Tensors keep the file's dtypes.
pub fn read_weights(path: &Path) -> Result<HashMap<String, Tensor>> {
    match weights_format(path)? {
        WeightsFormat::TorchZip => return Ok(pth::read_zip(path)?.tensors),
        WeightsFormat::TorchLegacy => return Ok(pth::read_legacy(path)?.tensors),
        WeightsFormat::Safetensors | WeightsFormat::SafetensorsIndex => {}
    }
    let name = path.to_string_lossy();
    if name.ends_with(".json") {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading index {}", path.display()))?;
        let index: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not valid JSON", path.display()))?;
        let map = index
            .get("weight_map")
            .and_then(|m| m.as_object())
            .with_context(|| format!("{}: no `weight_map` object", path.display()))?;
        let dir = path
            .parent()
            .map(Path::to_path_buf)
            .unwrap_or_else(|| PathBuf::from("."));
        let shards: BTreeSet<&str> = map.values().filter_map(|v| v.as_str()).collect();
        let mut out = HashMap::new();
        for shard in shards {
            let p = dir.join(shard);
            let t = candle_core::safetensors::load(&p, &Device::Cpu)
                .with_context(|| format!("reading shard {} of {}", p.display(), path.display()))?;
            out.extend(t);
        }
        for k in map.keys() {
            if !out.contains_key(k) {
                bail!(
                    "{}: tensor `{k}` is listed in the index but absent from its shard",
                    path.display()
                );
            }
        }
        Ok(out)
    } else {
        candle_core::safetensors::load(path, &Device::Cpu)
            .with_context(|| format!("reading safetensors {}", path.display()))
    }
}

/// The tensor names of a weights file, sorted, without reading a tensor: from a
/// `*.safetensors` header, a `*.safetensors.index.json`, or a PyTorch checkpoint's pickle (a
/// legacy-format one is read whole).
pub fn checkpoint_keys(path: &Path) -> Result<Vec<String>> {
    let format = weights_format(path)?;
    match format {
        WeightsFormat::TorchZip => return pth::zip_keys(path),
        WeightsFormat::TorchLegacy => {
            let mut k: Vec<String> = pth::read_legacy(path)?.tensors.into_keys().collect();
            k.sort();
            return Ok(k);
        }
        WeightsFormat::Safetensors | WeightsFormat::SafetensorsIndex => {}
    }
    let json: serde_json::Value = if format == WeightsFormat::SafetensorsIndex {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading index {}", path.display()))?;
        let index: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not valid JSON", path.display()))?;
        index
            .get("weight_map")
            .cloned()
            .with_context(|| format!("{}: no `weight_map` object", path.display()))?
    } else {
        safetensors_header(path)?
    };
    let map = json
        .as_object()
        .with_context(|| format!("{}: the tensor table is not an object", path.display()))?;
    let mut keys: Vec<String> = map
        .keys()
        .filter(|k| *k != "__metadata__")
        .cloned()
        .collect();
    keys.sort();
    Ok(keys)
}

/// The JSON header of the `*.safetensors` file `path` (tensor table and `__metadata__`).
fn safetensors_header(path: &Path) -> Result<serde_json::Value> {
    use std::io::Read;
    let mut f = std::fs::File::open(path)
        .with_context(|| format!("reading safetensors {}", path.display()))?;
    let mut n = [0u8; 8];
    f.read_exact(&mut n)
        .with_context(|| format!("{}: no safetensors header", path.display()))?;
    // The header must fit the file (and safetensors' 100 MB cap): a foreign file's first
    // 8 bytes read as a length aborted the process on allocating it.
    let len = u64::from_le_bytes(n);
    let file_len = f.metadata().map_or(0, |m| m.len());
    if len > file_len.saturating_sub(8) || len > 100_000_000 {
        bail!(
            "{}: safetensors header of {len} bytes does not fit the {file_len}-byte file \
             (not a safetensors file?)",
            path.display()
        );
    }
    let mut header = vec![0u8; len as usize];
    f.read_exact(&mut header)
        .with_context(|| format!("{}: truncated safetensors header", path.display()))?;
    serde_json::from_slice(&header)
        .with_context(|| format!("{}: safetensors header is not JSON", path.display()))
}

/// The `__metadata__` strings of a `*.safetensors` file (mimlab's converted files and the
/// fixtures keep the model config JSON under `config`); empty for other formats.
pub fn weights_metadata(path: &Path) -> Result<HashMap<String, String>> {
    if weights_format(path)? != WeightsFormat::Safetensors {
        return Ok(HashMap::new());
    }
    let header = safetensors_header(path)?;
    let Some(meta) = header.get("__metadata__") else {
        return Ok(HashMap::new());
    };
    serde_json::from_value(meta.clone())
        .with_context(|| format!("{}: __metadata__ is not a string map", path.display()))
}

/// Writes `tensors` to `path` as safetensors with `metadata` (`__metadata__`), atomically
/// ([`mimlab_engine::fsutil::write_atomic_with`]), creating its folder if needed.
pub fn save_weights(
    path: &Path,
    tensors: &HashMap<String, Tensor>,
    metadata: HashMap<String, String>,
) -> Result<()> {
    ensure_parent(path)?;
    write_atomic_with(path, |tmp| {
        safetensors::serialize_to_file(tensors.iter(), Some(metadata), tmp)
            .with_context(|| format!("writing {}", tmp.display()))
    })
}

/// True for the buffers official files carry that are always re-derived (architecture.md 2.1).
fn is_derived_buffer(k: &str) -> bool {
    [
        "relative_position_index",
        "relative_coords_table",
        "attn_mask",
        "k_bias",
    ]
    .iter()
    .any(|b| k.contains(b))
}

/// `layers.{i}.downsample.rest` -> (i, rest).
fn downsample_index(k: &str) -> Option<(usize, &str)> {
    let rest = k.strip_prefix("layers.")?;
    let (i, rest) = rest.split_once('.')?;
    let rest = rest.strip_prefix("downsample.")?;
    Some((i.parse().ok()?, rest))
}

/// Guesses the layout from key names: timm if the classifier is `head.fc` or the first
/// downsample sits in `layers.1+` with none in `layers.0`; official if re-derived buffers,
/// `rpe_mlp` or a `model.` prefix are present; mimlab otherwise.
pub fn detect_layout<S: AsRef<str>>(keys: impl IntoIterator<Item = S>) -> Layout {
    let (mut ds0, mut ds_later, mut head_fc, mut official) = (false, false, false, false);
    for k in keys {
        let k = k.as_ref();
        let k = k.strip_prefix("model.").map_or(k, |s| {
            official = true;
            s
        });
        match downsample_index(k) {
            Some((0, _)) => ds0 = true,
            Some(_) => ds_later = true,
            None => {}
        }
        head_fc |= k.starts_with("head.fc.");
        official |= is_derived_buffer(k) || k.contains("rpe_mlp");
    }
    if head_fc || (ds_later && !ds0) {
        Layout::Timm
    } else if official {
        Layout::Official
    } else {
        Layout::Mimlab
    }
}

/// official / timm -> mimlab (= official) keys, following architecture.md 2.1/2.2: strip a
/// leading `model.`, drop relative_position_index / relative_coords_table / attn_mask / k_bias,
/// `rpe_mlp` -> `cpb_mlp`, and for timm shift `layers.{i}.downsample` to `layers.{i-1}` and
/// `head.fc.` -> `head.`. Keys under another prefix (a pretraining objective's) pass through;
/// the caller names that prefix in `LoadOptions::prefix`.
pub fn remap_to_mimlab(
    tensors: HashMap<String, Tensor>,
) -> Result<(HashMap<String, Tensor>, Layout)> {
    let layout = detect_layout(tensors.keys());
    let mut out = HashMap::with_capacity(tensors.len());
    for (k, t) in tensors {
        let k0 = k.strip_prefix("model.").unwrap_or(&k);
        if is_derived_buffer(k0) {
            continue;
        }
        let mut nk = k0.replace("rpe_mlp", "cpb_mlp");
        if layout == Layout::Timm {
            if let Some((i, rest)) = downsample_index(&nk) {
                if i == 0 {
                    bail!("timm-layout checkpoint has `{k}`: timm stage 0 has no downsample");
                }
                nk = format!("layers.{}.downsample.{rest}", i - 1);
            } else if let Some(rest) = nk.strip_prefix("head.fc.") {
                nk = format!("head.{rest}");
            }
        }
        if out.insert(nk.clone(), t).is_some() {
            bail!("two checkpoint tensors map to the same key `{nk}` (last from `{k}`)");
        }
    }
    Ok((out, layout))
}

/// mimlab keys -> `layout`'s, the reverse of [`remap_to_mimlab`]: timm moves
/// `layers.{i}.downsample` to `layers.{i+1}` and `head.` to `head.fc.`; official adds the
/// persistent buffers the official model registers (per block `attn.relative_coords_table`
/// `[1, 2ws-1, 2ws-1, 2]` f32, `attn.relative_position_index` `[N, N]` i64, and `attn_mask`
/// `[nW, N, N]` f32 in shifted blocks), derived from `cfg` as the model derives them; mimlab as
/// is. `tensors` must be a plain (per-block CPB, unprefixed) Swin-V2 state dict of `cfg`.
pub fn remap_from_mimlab(
    tensors: HashMap<String, Tensor>,
    layout: Layout,
    cfg: &SwinV2Config,
) -> Result<HashMap<String, Tensor>> {
    let mut out = HashMap::with_capacity(tensors.len());
    for (k, t) in tensors {
        let nk = match (layout, downsample_index(&k), k.strip_prefix("head.")) {
            (Layout::Timm, Some((i, rest)), _) => format!("layers.{}.downsample.{rest}", i + 1),
            (Layout::Timm, None, Some(rest)) if !rest.starts_with("fc.") => {
                format!("head.fc.{rest}")
            }
            _ => k.clone(),
        };
        if out.insert(nk.clone(), t).is_some() {
            bail!("two tensors map to the same {layout:?} key `{nk}` (last from `{k}`)");
        }
    }
    if layout == Layout::Official {
        let dev = Device::Cpu;
        let res = cfg.img_size / cfg.patch_size;
        for (i, &depth) in cfg.depths.iter().enumerate() {
            let (ws, shift) = cfg.stage_window(i);
            let side = 2 * ws - 1;
            let pre = cfg.pretrained_window_sizes.get(i).copied().unwrap_or(0);
            let coords =
                Tensor::from_vec(relative_coords_table(ws, pre), (1, side, side, 2), &dev)?;
            let index = Tensor::from_vec(relative_position_index(ws), (ws * ws, ws * ws), &dev)?
                .to_dtype(DType::I64)?;
            let r = res >> i;
            for j in 0..depth {
                let block = format!("layers.{i}.blocks.{j}");
                out.insert(
                    format!("{block}.attn.relative_coords_table"),
                    coords.clone(),
                );
                out.insert(
                    format!("{block}.attn.relative_position_index"),
                    index.clone(),
                );
                if j % 2 == 1 && shift > 0 {
                    let mask = shifted_window_mask(r, r, ws, shift, &dev)?;
                    out.insert(format!("{block}.attn_mask"), mask);
                }
            }
        }
    }
    Ok(out)
}

/// A shared-CPB checkpoint (`SwinV2Config::shared_cpb`: one `{prefix}cpb_mlp.*` for the whole
/// model) -> per-block `{prefix}layers.{i}.blocks.{j}.attn.cpb_mlp.{0.weight,0.bias,2.weight}`,
/// the output rows of `2.weight` cut to that block's heads (read from its `logit_scale`
/// `[heads, 1, 1]`). Like FD's `remap_pretrained_keys_vit` copying the shared relative position
/// bias into every block (architecture.md 5); the model computes the same outputs before and
/// after. Tensors without shared keys are returned unchanged.
pub fn unshare_cpb(
    mut tensors: HashMap<String, Tensor>,
    prefix: &str,
) -> Result<HashMap<String, Tensor>> {
    let key = |s: &str| format!("{prefix}cpb_mlp.{s}");
    let Some(w0) = tensors.remove(&key("0.weight")) else {
        return Ok(tensors);
    };
    let b0 = tensors.remove(&key("0.bias")).with_context(|| {
        format!(
            "shared CPB: `{}` without `{}`",
            key("0.weight"),
            key("0.bias")
        )
    })?;
    let w2 = tensors.remove(&key("2.weight")).with_context(|| {
        format!(
            "shared CPB: `{}` without `{}`",
            key("0.weight"),
            key("2.weight")
        )
    })?;
    let max_heads = w2.dim(0)?;
    let blocks: Vec<(String, usize)> = tensors
        .iter()
        .filter_map(|(k, t)| {
            let block = k.strip_prefix(prefix)?.strip_suffix(".attn.logit_scale")?;
            block
                .starts_with("layers.")
                .then(|| (block.to_string(), t.dims()[0]))
        })
        .collect();
    if blocks.is_empty() {
        bail!("shared CPB: no `{prefix}layers.*.attn.logit_scale` to read the blocks' heads from");
    }
    for (block, heads) in blocks {
        if heads > max_heads {
            bail!(
                "shared CPB: `{prefix}{block}` has {heads} heads, `{}` only {max_heads} rows",
                key("2.weight")
            );
        }
        let at = |s: &str| format!("{prefix}{block}.attn.cpb_mlp.{s}");
        tensors.insert(at("0.weight"), w0.clone());
        tensors.insert(at("0.bias"), b0.clone());
        tensors.insert(at("2.weight"), w2.narrow(0, 0, heads)?.contiguous()?);
    }
    Ok(tensors)
}

/// What [`load_into_varmap`] did.
#[derive(Debug, Clone)]
pub struct LoadReport {
    /// Variables overwritten from the checkpoint.
    pub loaded: usize,
    /// Model variables left at init (covered by `allow_missing`).
    pub missing_allowed: Vec<String>,
    /// Checkpoint keys skipped (covered by `ignore_unexpected`).
    pub ignored: Vec<String>,
    /// Layout detected after taking off `prefix`.
    pub layout: Layout,
}

/// The engine's strict [`mimlab_engine::trainer::checkpoint::load_into_varmap`] (prefix taken
/// off, missing / unexpected / mis-shaped keys named, nothing written unless every check passes)
/// with official/timm keys remapped to mimlab's first ([`remap_to_mimlab`]; re-derived buffers
/// are dropped). Errors name the detected layout.
pub fn load_into_varmap(
    varmap: &VarMap,
    tensors: HashMap<String, Tensor>,
    opts: &LoadOptions,
) -> Result<LoadReport> {
    let mut layout = None;
    let r = load_into_varmap_renamed(varmap, tensors, opts, |t| {
        let (t, l) = remap_to_mimlab(t)?;
        layout = Some(l);
        Ok(t)
    });
    let layout = layout.unwrap_or(Layout::Mimlab);
    let r = r.with_context(|| format!("{layout:?} key layout"))?;
    Ok(LoadReport {
        loaded: r.loaded,
        missing_allowed: r.missing_allowed,
        ignored: r.ignored,
        layout,
    })
}

/// Writes every variable of `varmap` to `path` (safetensors) atomically
/// ([`mimlab_engine::fsutil::write_atomic_with`]), creating its folder if needed.
pub fn save_varmap(varmap: &VarMap, path: &Path) -> Result<()> {
    ensure_parent(path)?;
    save_tensors(path, &varmap_tensors(varmap))
}

#[cfg(test)]
mod tests {
    use super::*;
    use candle_core::DType;

    fn t(shape: &[usize]) -> Tensor {
        Tensor::zeros(shape, DType::F32, &Device::Cpu).unwrap()
    }

    #[test]
    fn a_pytorch_pickle_loads_and_garbage_is_an_error_not_an_abort() {
        // The official release format (`{'model': state_dict}`, zip) reads by content whatever
        // its name; scripts/make_pth_fixtures.py wrote it from swinv2_a.official.safetensors.
        let fixtures = Path::new(env!("CARGO_MANIFEST_DIR")).join("../tests/fixtures");
        let dir = tempfile::tempdir().unwrap();
        let renamed = dir.path().join("weights.safetensors");
        std::fs::copy(fixtures.join("swinv2_a.official.pth"), &renamed).unwrap();
        let keys = checkpoint_keys(&renamed).unwrap();
        assert_eq!(keys.len(), 86);
        assert_eq!(keys[0], "layers.0.blocks.0.attn.cpb_mlp.0.bias");
        let t = read_weights(&renamed).unwrap();
        assert_eq!(t["patch_embed.proj.weight"].dims(), [16, 3, 4, 4]);
        assert_eq!(detect_layout(t.keys()), Layout::Official);
        let p = dir.path().join("bad.safetensors");
        std::fs::write(&p, "notsafetensors\n").unwrap();
        let err = checkpoint_keys(&p).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "{}: safetensors header of 8387222449782288238 bytes does not fit the 15-byte \
                 file (not a safetensors file?)",
                p.display()
            )
        );
        // zip magic without an archive behind it
        std::fs::write(&p, b"PK\x03\x04 not a zip").unwrap();
        let err = format!("{:#}", read_weights(&p).unwrap_err());
        assert!(
            err.starts_with(&format!("{}: not a readable zip archive", p.display())),
            "{err}"
        );
    }

    #[test]
    fn detects_and_remaps_layouts() -> Result<()> {
        let timm: HashMap<String, Tensor> = [
            ("layers.1.downsample.reduction.weight", t(&[4, 8])),
            ("layers.0.blocks.0.attn.q_bias", t(&[2])),
            ("head.fc.weight", t(&[3, 4])),
            ("head.fc.bias", t(&[3])),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let (m, l) = remap_to_mimlab(timm)?;
        assert_eq!(l, Layout::Timm);
        let mut keys: Vec<_> = m.keys().cloned().collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "head.bias",
                "head.weight",
                "layers.0.blocks.0.attn.q_bias",
                "layers.0.downsample.reduction.weight"
            ]
        );
        let official: HashMap<String, Tensor> = [
            ("model.layers.0.downsample.reduction.weight", t(&[4, 8])),
            ("model.layers.0.blocks.1.attn_mask", t(&[1])),
            (
                "model.layers.0.blocks.1.attn.relative_position_index",
                t(&[1]),
            ),
            (
                "model.layers.0.blocks.1.attn.rpe_mlp.0.weight",
                t(&[512, 2]),
            ),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let (m, l) = remap_to_mimlab(official)?;
        assert_eq!(l, Layout::Official);
        let mut keys: Vec<_> = m.keys().cloned().collect();
        keys.sort();
        assert_eq!(
            keys,
            [
                "layers.0.blocks.1.attn.cpb_mlp.0.weight",
                "layers.0.downsample.reduction.weight"
            ]
        );
        assert_eq!(
            detect_layout(["layers.0.blocks.0.norm1.weight", "head.weight"]),
            Layout::Mimlab
        );
        Ok(())
    }
}
