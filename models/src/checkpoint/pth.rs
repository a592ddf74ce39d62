//! PyTorch checkpoints (`torch.save`, `*.pth` / `*.pt` / `*.bin`): the state dict found under
//! `model` (official Swin / SimMIM releases), `state_dict`, `module` or at the top level (timm /
//! HF `pytorch_model.bin`), read with candle's pickle reader. Both of torch's formats: the zip
//! archive (torch >= 1.6, `archive/data.pkl` + one entry per storage) and the legacy stream
//! (magic number, protocol, sys info, the object, the storage keys, then each storage's bytes).
use std::collections::HashMap;
use std::io::{BufReader, Cursor, Read};
use std::path::Path;

use anyhow::{bail, Context, Result};
use candle_core::pickle::{Object, Stack, TensorInfo};
use candle_core::{Device, Tensor};

/// Where a state dict may sit in a checkpoint's top-level dict, in the order they are tried
/// before the top level itself.
pub const STATE_DICT_KEYS: [&str; 3] = ["model", "state_dict", "module"];

/// The first bytes of a legacy (pre-zip) `torch.save` stream: pickle protocol 2, then
/// `LONG1` of torch's magic number 0x1950a86a20f9469cfc6c.
pub const LEGACY_MAGIC: [u8; 14] = [
    0x80, 0x02, 0x8a, 0x0a, 0x6c, 0xfc, 0x9c, 0x46, 0xf9, 0x20, 0x6a, 0xa8, 0x50, 0x19,
];

/// Reads one pickle from `r` (up to its STOP).
fn read_pickle<R: std::io::BufRead>(r: &mut R) -> Result<Object> {
    let mut stack = Stack::empty();
    stack.read_loop(r)?;
    Ok(stack.finalize()?)
}

/// A TorchScript module (`__torch__.Module` built from a dict) -> that dict; anything else as is.
fn unwrap_module(obj: Object) -> Object {
    match obj {
        Object::Build { callable, args } => match *callable {
            Object::Reduce {
                callable: c,
                args: a,
            } => match *c {
                Object::Class {
                    ref module_name,
                    ref class_name,
                } if module_name == "__torch__" && class_name == "Module" => *args,
                c => Object::Build {
                    callable: Box::new(Object::Reduce {
                        callable: Box::new(c),
                        args: a,
                    }),
                    args,
                },
            },
            callable => Object::Build {
                callable: Box::new(callable),
                args,
            },
        },
        obj => obj,
    }
}

/// The tensors described by the dict `obj` (storage paths under `dir`); other values skipped.
fn tensor_infos(obj: Object, dir: &str) -> Vec<TensorInfo> {
    let Object::Dict(entries) = obj else {
        return vec![];
    };
    entries
        .into_iter()
        .filter_map(|(k, v)| v.into_tensor_info(k, Path::new(dir)).ok().flatten())
        .collect()
}

/// Picks the state dict of the top-level object `obj`: the first of [`STATE_DICT_KEYS`] whose
/// value holds tensors, else the top level. Errors name `path` and the top-level keys.
fn state_dict(obj: Object, dir: &str, path: &Path) -> Result<(Vec<TensorInfo>, Option<String>)> {
    let obj = unwrap_module(obj);
    let Object::Dict(entries) = obj else {
        bail!(
            "{}: the PyTorch checkpoint holds no dict (a pickled module or object?); save its \
             state_dict()",
            path.display()
        );
    };
    let mut names: Vec<String> = entries
        .iter()
        .map(|(k, _)| match k {
            Object::Unicode(s) => s.clone(),
            other => format!("{other:?}"),
        })
        .collect();
    names.sort();
    for key in STATE_DICT_KEYS {
        if let Some((_, v)) = entries
            .iter()
            .find(|(k, _)| matches!(k, Object::Unicode(s) if s == key))
        {
            let infos = tensor_infos(v.clone(), dir);
            if !infos.is_empty() {
                return Ok((infos, Some(key.to_string())));
            }
        }
    }
    let infos = tensor_infos(Object::Dict(entries), dir);
    if infos.is_empty() {
        let mut shown: Vec<String> = names.iter().take(20).map(|n| format!("`{n}`")).collect();
        if names.len() > 20 {
            shown.push(format!("and {} more", names.len() - 20));
        }
        bail!(
            "{}: no tensors under `model`, `state_dict`, `module` or at the top level of the \
             PyTorch checkpoint (top-level keys: {})",
            path.display(),
            if shown.is_empty() {
                "none".to_string()
            } else {
                shown.join(", ")
            }
        );
    }
    Ok((infos, None))
}

/// The tensor `info` from the bytes of its storage (`data` starts at the storage's first byte).
fn tensor_from_storage(info: &TensorInfo, data: &[u8]) -> Result<Tensor> {
    let layout = &info.layout;
    let fortran = layout.is_fortran_contiguous() && layout.shape().rank() > 1;
    if !layout.is_contiguous() && !fortran {
        bail!(
            "tensor `{}` is stored strided ({:?}); only contiguous tensors are read",
            info.name,
            layout
        );
    }
    let start = layout.start_offset();
    let n = layout.shape().elem_count() * info.dtype.size_in_bytes();
    let bytes = data.get(start..start + n).with_context(|| {
        format!(
            "tensor `{}`: its storage holds {} bytes, the tensor needs {} from byte {start}",
            info.name,
            data.len(),
            n
        )
    })?;
    if fortran {
        // column-major: read with the reversed shape, then reverse the dims
        let dims: Vec<usize> = layout.dims().iter().rev().copied().collect();
        let t = Tensor::from_raw_buffer(bytes, info.dtype, &dims, &Device::Cpu)?;
        let rev: Vec<usize> = (0..dims.len()).rev().collect();
        Ok(t.permute(rev)?.contiguous()?)
    } else {
        Ok(Tensor::from_raw_buffer(
            bytes,
            info.dtype,
            layout.dims(),
            &Device::Cpu,
        )?)
    }
}

/// A state dict read from a PyTorch checkpoint.
pub struct PthStateDict {
    /// Tensors by name, on the CPU, in the dtypes of the file.
    pub tensors: HashMap<String, Tensor>,
    /// The top-level key that held them (`model`, ...), None for the top level.
    pub key: Option<String>,
}

/// The names of the state dict of the zip-format checkpoint `path` (no tensor read) and the key
/// it sits under.
fn zip_infos(path: &Path) -> Result<(Vec<TensorInfo>, Option<String>)> {
    let file = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut zip = zip::ZipArchive::new(BufReader::new(file))
        .with_context(|| format!("{}: not a readable zip archive", path.display()))?;
    let pkl = zip
        .file_names()
        .filter_map(|n| n.ok())
        .find(|n| n.ends_with("data.pkl"))
        .map(|n| n.into_owned())
        .with_context(|| format!("{}: a zip archive without data.pkl", path.display()))?;
    let dir = pkl.strip_suffix(".pkl").unwrap_or(&pkl).to_string();
    let obj = {
        let entry = zip.by_name(&pkl)?;
        read_pickle(&mut BufReader::new(entry))
            .with_context(|| format!("{}: reading {pkl}", path.display()))?
    };
    state_dict(obj, &dir, path)
}

/// Reads the state dict of the zip-format PyTorch checkpoint `path`.
pub fn read_zip(path: &Path) -> Result<PthStateDict> {
    let (infos, key) = zip_infos(path)?;
    let file = std::fs::File::open(path).with_context(|| format!("reading {}", path.display()))?;
    let mut zip = zip::ZipArchive::new(BufReader::new(file))?;
    let mut storages: HashMap<String, Vec<u8>> = HashMap::new();
    let mut tensors = HashMap::with_capacity(infos.len());
    for info in &infos {
        if !storages.contains_key(&info.path) {
            let mut entry = zip
                .by_name(&info.path)
                .with_context(|| format!("{}: no storage {}", path.display(), info.path))?;
            let mut buf = Vec::with_capacity(entry.size() as usize);
            entry.read_to_end(&mut buf)?;
            storages.insert(info.path.clone(), buf);
        }
        let t = tensor_from_storage(info, &storages[&info.path])
            .with_context(|| format!("reading {}", path.display()))?;
        tensors.insert(info.name.clone(), t);
    }
    Ok(PthStateDict { tensors, key })
}

/// The tensor names of the zip-format PyTorch checkpoint `path`, sorted (no tensor read).
pub fn zip_keys(path: &Path) -> Result<Vec<String>> {
    let mut k: Vec<String> = zip_infos(path)?.0.into_iter().map(|i| i.name).collect();
    k.sort();
    Ok(k)
}

/// The element size of every storage referenced in `obj` (legacy persistent ids
/// `('storage', torch.XStorage, key, location, numel, view)`), by key.
fn storage_elem_sizes(obj: &Object, out: &mut HashMap<String, usize>) {
    match obj {
        Object::PersistentLoad(id) => {
            if let Object::Tuple(v) = id.as_ref() {
                if let (Some(Object::Class { class_name, .. }), Some(Object::Unicode(key))) =
                    (v.get(1), v.get(2))
                {
                    let size = match class_name.as_str() {
                        "DoubleStorage" | "LongStorage" => 8,
                        "FloatStorage" | "IntStorage" => 4,
                        "HalfStorage" | "BFloat16Storage" | "ShortStorage" => 2,
                        _ => 1, // Byte, Char, Bool
                    };
                    out.insert(key.clone(), size);
                }
            }
        }
        Object::Tuple(v) | Object::List(v) => v.iter().for_each(|o| storage_elem_sizes(o, out)),
        Object::Dict(v) => v.iter().for_each(|(a, b)| {
            storage_elem_sizes(a, out);
            storage_elem_sizes(b, out);
        }),
        Object::Reduce { callable, args } | Object::Build { callable, args } => {
            storage_elem_sizes(callable, out);
            storage_elem_sizes(args, out);
        }
        _ => {}
    }
}

/// Reads the state dict of the legacy-format (`_use_new_zipfile_serialization=False`)
/// PyTorch checkpoint `path`.
pub fn read_legacy(path: &Path) -> Result<PthStateDict> {
    let bytes = std::fs::read(path).with_context(|| format!("reading {}", path.display()))?;
    let ctx = || format!("{}: legacy PyTorch checkpoint", path.display());
    // The magic number pickle is LEGACY_MAGIC then STOP; skipped by hand, since candle's LONG1
    // decoder overflows on its 10 bytes.
    let magic_len = LEGACY_MAGIC.len();
    if !bytes.starts_with(&LEGACY_MAGIC) || bytes.get(magic_len) != Some(&b'.') {
        bail!("{}: no torch magic number", ctx());
    }
    let mut r = Cursor::new(&bytes[magic_len + 1..]);
    for what in ["protocol", "sys info"] {
        read_pickle(&mut r).with_context(|| format!("{}: its {what}", ctx()))?;
    }
    let obj = read_pickle(&mut r).with_context(ctx)?;
    let obj_for_sizes = obj.clone();
    // storage paths are `{dir}/{key}`: an empty dir keeps the key after the '/'
    let (infos, key) = state_dict(obj, "", path)?;
    let keys: Vec<String> = match read_pickle(&mut r).with_context(ctx)? {
        Object::List(v) => v
            .into_iter()
            .map(|o| {
                o.unicode()
                    .map_err(|o| anyhow::anyhow!("storage key {o:?}"))
            })
            .collect::<Result<_>>()
            .with_context(ctx)?,
        other => bail!("{}: storage keys are not a list ({other:?})", ctx()),
    };
    // Each storage: its element count (u64 LE), then its bytes; every storage of the object
    // (an optimizer's too) is in the stream, its element size named by its persistent id.
    let mut elem_size = HashMap::new();
    storage_elem_sizes(&obj_for_sizes, &mut elem_size);
    let mut pos = magic_len + 1 + r.position() as usize;
    let mut storages: HashMap<&str, &[u8]> = HashMap::new();
    for k in &keys {
        let n = bytes
            .get(pos..pos + 8)
            .with_context(|| format!("{}: truncated at storage {k}", ctx()))?;
        let n = u64::from_le_bytes(n.try_into()?) as usize;
        let size = *elem_size
            .get(k.as_str())
            .with_context(|| format!("{}: storage {k} of an unknown type", ctx()))?;
        let len = n
            .checked_mul(size)
            .with_context(|| format!("{}: storage {k} of {n} elements", ctx()))?;
        pos += 8;
        let data = bytes
            .get(pos..pos + len)
            .with_context(|| format!("{}: truncated in storage {k}", ctx()))?;
        storages.insert(k.as_str(), data);
        pos += len;
    }
    let mut tensors = HashMap::with_capacity(infos.len());
    for info in &infos {
        let k = info.path.trim_start_matches('/');
        let data = storages
            .get(k)
            .with_context(|| format!("{}: tensor `{}` has no storage {k}", ctx(), info.name))?;
        tensors.insert(
            info.name.clone(),
            tensor_from_storage(info, data).with_context(ctx)?,
        );
    }
    Ok(PthStateDict { tensors, key })
}
