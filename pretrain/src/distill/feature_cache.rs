//! Teacher-feature cache for feature distillation: the teacher forward is the expensive part of an
//! FD step on CPU, so with `distill.cache_features` every sample gets ONE fixed crop (drawn from
//! (run seed, index) by [`DataLoader::fixed_augmentation`], the same in every epoch) and its
//! whitened teacher features are computed once and kept on disk.
//!
//! Folder layout: `features.safetensors` (`features` `[N, L, C_t]` f32 in dataset-index order;
//! `crops` `[N, 5]` u32 = top, left, height, width, flip in source pixels, when the dataset can
//! tell its crops) and `header.json` ([`CacheHeader`]: the teacher weights path and a hash of
//! everything the features depend on), each written atomically, the header last. A cache made for
//! another teacher or config is refused.
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use anyhow::{bail, ensure, Context, Result};
use candle_core::{DType, Device, Tensor};
use mimlab_engine::data::DataLoader;
use mimlab_engine::fsutil::write_atomic;
use mimlab_engine::trainer::checkpoint::save_tensors;
use serde::{Deserialize, Serialize};

use crate::distill::Teacher;

/// Format version of the cache folder.
pub const CACHE_VERSION: u32 = 1;

/// `header.json`: what the cached features were computed from.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CacheHeader {
    /// [`CACHE_VERSION`].
    pub version: u32,
    /// The teacher weights file.
    pub teacher_weights: PathBuf,
    /// FNV-1a hash (hex) of the teacher config, student input and map, data section, seed and
    /// whitening: see [`config_hash`].
    pub config_hash: String,
    /// Samples in the dataset.
    pub num_samples: usize,
    /// Tokens per sample (student map h*w).
    pub tokens: usize,
    /// Teacher channels.
    pub channels: usize,
    /// Whether `crops` is stored.
    pub crops: bool,
}

/// 64-bit FNV-1a of `text`, as 16 hex digits.
pub fn config_hash(text: &str) -> String {
    let h = text.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| {
        (h ^ b as u64).wrapping_mul(0x1000_0000_01b3)
    });
    format!("{h:016x}")
}

/// Cached whitened teacher features of every sample, in memory.
pub struct FeatureCache {
    /// What the features were computed from.
    pub header: CacheHeader,
    /// `[N, L, C_t]` f32 on the CPU.
    pub features: Tensor,
    /// Per sample: crop box (top, left, height, width) and flip, when known.
    pub crops: Option<Vec<[u32; 5]>>,
}

impl FeatureCache {
    /// Runs `teacher` once over every sample of `loader` (which must use
    /// [`DataLoader::fixed_augmentation`], so the crops are the training ones) and records the
    /// crops. `header` gives teacher path and hash; its sizes are filled in here.
    pub fn build(
        loader: &DataLoader,
        teacher: &Teacher,
        map: (usize, usize),
        mut header: CacheHeader,
        device: &Device,
    ) -> Result<Self> {
        let ds = loader.dataset();
        let n = ds.len();
        let tokens = map.0 * map.1;
        let ch = teacher.config().num_features();
        let mut feats = vec![0f32; n * tokens * ch];
        let mut seen = vec![false; n];
        let mut crops = Vec::with_capacity(n);
        for i in 0..n {
            // epoch 0: with fixed augmentation every epoch draws the same
            let c = ds.crop_params(i, &mut loader.sample_rng(0, i))?;
            crops.push(
                c.map(|(b, f)| [b.top, b.left, b.height, b.width, f as usize].map(|v| v as u32)),
            );
        }
        let bar = mimlab_engine::log::Progress::new(
            "teacher features",
            loader.batches_per_epoch() as u64,
            0,
        );
        for batch in loader.epoch(0, 0) {
            let batch = batch.context("feature cache: loading a batch")?;
            let x = batch.images.to_device(device)?;
            let f = teacher.features(&x, map)?.to_device(&Device::Cpu)?;
            let f = f.to_dtype(DType::F32)?.flatten_all()?.to_vec1::<f32>()?;
            for (k, &i) in batch.indices.iter().enumerate() {
                let per = tokens * ch;
                feats[i * per..(i + 1) * per].copy_from_slice(&f[k * per..(k + 1) * per]);
                seen[i] = true;
            }
            bar.inc(1);
        }
        bar.finish("done");
        if let Some(i) = seen.iter().position(|s| !s) {
            bail!("feature cache: sample {i} was never served (an undecodable image?)");
        }
        header.num_samples = n;
        header.tokens = tokens;
        header.channels = ch;
        header.crops = crops.iter().all(Option::is_some);
        let crops = header
            .crops
            .then(|| crops.into_iter().map(|c| c.unwrap_or_default()).collect());
        Ok(Self {
            header,
            features: Tensor::from_vec(feats, (n, tokens, ch), &Device::Cpu)?,
            crops,
        })
    }

    /// Writes `dir/features.safetensors` then `dir/header.json`, each atomically.
    pub fn save(&self, dir: &Path) -> Result<()> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let mut t = HashMap::from([("features".to_string(), self.features.clone())]);
        if let Some(c) = &self.crops {
            let flat: Vec<u32> = c.iter().flatten().copied().collect();
            t.insert(
                "crops".into(),
                Tensor::from_vec(flat, (c.len(), 5), &Device::Cpu)?,
            );
        }
        save_tensors(&dir.join("features.safetensors"), &t)?;
        let json = serde_json::to_string_pretty(&self.header)?;
        write_atomic(&dir.join("header.json"), json.as_bytes())
    }

    /// Reads a cache folder and checks it was made for `expected` (teacher, hash, sizes).
    pub fn load(dir: &Path, expected: &CacheHeader) -> Result<Self> {
        let hp = dir.join("header.json");
        let text =
            std::fs::read_to_string(&hp).with_context(|| format!("reading {}", hp.display()))?;
        let header: CacheHeader = serde_json::from_str(&text)
            .with_context(|| format!("{}: not a cache header", hp.display()))?;
        let stale = |what: &str, have: String, want: String| {
            anyhow::anyhow!(
                "distill.cache_features {}: made for {what} {have}, this run has {want}; delete \
                 the folder or point distill.cache_features elsewhere",
                dir.display()
            )
        };
        if header.version != CACHE_VERSION {
            return Err(stale(
                "cache version",
                header.version.to_string(),
                CACHE_VERSION.to_string(),
            ));
        }
        if header.teacher_weights != expected.teacher_weights {
            return Err(stale(
                "teacher",
                header.teacher_weights.display().to_string(),
                expected.teacher_weights.display().to_string(),
            ));
        }
        if header.config_hash != expected.config_hash {
            return Err(stale(
                "config hash",
                header.config_hash.clone(),
                expected.config_hash.clone(),
            ));
        }
        let fp = dir.join("features.safetensors");
        let mut t = candle_core::safetensors::load(&fp, &Device::Cpu)
            .with_context(|| format!("reading {}", fp.display()))?;
        let features = t
            .remove("features")
            .with_context(|| format!("{}: no `features` tensor", fp.display()))?;
        let want = [header.num_samples, header.tokens, header.channels];
        ensure!(
            features.dims() == want,
            "{}: `features` has shape {:?}, header.json says {want:?}",
            fp.display(),
            features.dims()
        );
        let crops = match t.remove("crops") {
            Some(c) => Some(
                c.to_vec2::<u32>()?
                    .into_iter()
                    .map(|r| [r[0], r[1], r[2], r[3], r[4]])
                    .collect(),
            ),
            None => None,
        };
        Ok(Self {
            header,
            features,
            crops,
        })
    }

    /// [`Self::load`] when `dir/header.json` exists, else [`Self::build`] and [`Self::save`].
    pub fn open_or_build(
        dir: &Path,
        loader: &DataLoader,
        teacher: &Teacher,
        map: (usize, usize),
        expected: CacheHeader,
        device: &Device,
    ) -> Result<Self> {
        let cache = if dir.join("header.json").is_file() {
            Self::load(dir, &expected)?
        } else {
            let c = Self::build(loader, teacher, map, expected, device)?;
            c.save(dir)?;
            c
        };
        let n = loader.dataset().len();
        ensure!(
            cache.header.num_samples == n,
            "distill.cache_features {}: {} samples cached, the dataset has {n}",
            dir.display(),
            cache.header.num_samples
        );
        Ok(cache)
    }

    /// Features of `indices`, `[B, L, C_t]` on `device`.
    pub fn batch_features(&self, indices: &[usize], device: &Device) -> Result<Tensor> {
        let n = self.header.num_samples;
        if let Some(&i) = indices.iter().find(|&&i| i >= n) {
            bail!("feature cache: sample {i} out of range ({n} cached)");
        }
        let idx: Vec<u32> = indices.iter().map(|&i| i as u32).collect();
        let idx = Tensor::from_vec(idx, indices.len(), &Device::Cpu)?;
        Ok(self.features.index_select(&idx, 0)?.to_device(device)?)
    }
}
