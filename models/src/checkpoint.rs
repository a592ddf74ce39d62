//! Swin-V2 checkpoint layouts (architecture.md 2): reading safetensors (single or sharded),
//! detecting and remapping official / timm keys to mimlab's (= official) names, loading into a
//! `VarMap` with strict checks, and atomic saving.
use std::collections::{BTreeSet, HashMap};
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use candle_core::{Device, Tensor};
use candle_nn::VarMap;
use mimlab_engine::fsutil::ensure_parent;
pub use mimlab_engine::trainer::checkpoint::LoadOptions;
use mimlab_engine::trainer::checkpoint::{load_into_varmap_renamed, save_tensors, varmap_tensors};

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

/// Reads a `*.safetensors` file, or every shard named by a `*.safetensors.index.json`
/// (HF style `{"weight_map": {tensor: file}}`), onto the CPU.
pub fn read_safetensors(path: &Path) -> Result<HashMap<String, Tensor>> {
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

/// The tensor names of a `*.safetensors` file (from its header, no tensor read) or of a
/// `*.safetensors.index.json`, sorted.
pub fn checkpoint_keys(path: &Path) -> Result<Vec<String>> {
    let json: serde_json::Value = if path.to_string_lossy().ends_with(".json") {
        let text = std::fs::read_to_string(path)
            .with_context(|| format!("reading index {}", path.display()))?;
        let index: serde_json::Value = serde_json::from_str(&text)
            .with_context(|| format!("{}: not valid JSON", path.display()))?;
        index
            .get("weight_map")
            .cloned()
            .with_context(|| format!("{}: no `weight_map` object", path.display()))?
    } else {
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
            .with_context(|| format!("{}: safetensors header is not JSON", path.display()))?
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
    fn a_file_that_is_not_safetensors_is_an_error_not_an_abort() {
        let dir = tempfile::tempdir().unwrap();
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
