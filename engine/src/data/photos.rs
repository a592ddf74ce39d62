//! The `photos` dataset: real colour photos held in memory in compact form (longer side at most
//! [`COMPACT_SIDE`] px, cached as PNG under `ROOT/photos/.compact/`). Train = unlabelled random
//! crops of `photos/train` (`photos_crops_per_epoch` per epoch, photo = index mod count); eval =
//! the fixed held-out photos of `photos/heldout`.
use std::path::{Path, PathBuf};

use anyhow::{bail, Result};
use rand::rngs::StdRng;
use rayon::prelude::*;

use super::folder::{decode_image, list_images};
use super::transforms::{downscale_longer_side, ImageTransform, U8Image};
use super::{missing_bundled, subset, DataConfig, Dataset, Sample, Split, Target};

/// Longer side of the in-memory photos.
pub const COMPACT_SIDE: usize = 512;

/// Decodes `src` in compact form, reading/writing the PNG cache `cache` (rebuilt when older
/// than the source). A cache that cannot be written only costs the downscale next time.
pub fn load_compact(src: &Path, cache: &Path) -> Result<U8Image> {
    let fresh = |c: &Path| -> Option<bool> {
        let (cm, sm) = (
            c.metadata().ok()?.modified().ok()?,
            src.metadata().ok()?.modified().ok()?,
        );
        Some(cm >= sm)
    };
    if fresh(cache) == Some(true) {
        if let Ok(img) = decode_image(cache) {
            if img.width.max(img.height) <= COMPACT_SIDE {
                return Ok(img);
            }
        }
    }
    let img = downscale_longer_side(&decode_image(src)?, COMPACT_SIDE);
    let _ = write_png_atomic(&img, cache);
    Ok(img)
}

fn write_png_atomic(img: &U8Image, path: &Path) -> Result<()> {
    crate::fsutil::ensure_parent(path)?;
    let color = if img.channels == 3 {
        image::ColorType::Rgb8
    } else {
        image::ColorType::L8
    };
    crate::fsutil::write_atomic_with(path, |tmp| {
        Ok(image::save_buffer_with_format(
            tmp,
            &img.data,
            img.width as u32,
            img.height as u32,
            color,
            image::ImageFormat::Png,
        )?)
    })
}

/// The photos of `split` (`ROOT/photos/train` or `ROOT/photos/heldout`) in compact form, with
/// their folder and file names (sorted). Also the backgrounds of `digits-det`.
pub fn load_photos(root: &Path, split: Split) -> Result<(PathBuf, Vec<String>, Vec<U8Image>)> {
    let sub = match split {
        Split::Train => "train",
        Split::Eval => "heldout",
    };
    let dir = root.join("photos").join(sub);
    if !dir.is_dir() {
        return Err(missing_bundled(&dir));
    }
    let files = list_images(&dir)?;
    if files.is_empty() {
        bail!("{}: no photos: run scripts/setup-data.sh", dir.display());
    }
    let cache_dir = root.join("photos").join(".compact").join(sub);
    let photos = files
        .par_iter()
        .map(|f| {
            let name = f.file_name().unwrap_or_default().to_string_lossy();
            load_compact(f, &cache_dir.join(format!("{name}.png")))
        })
        .collect::<Result<Vec<_>>>()?;
    let names = files
        .iter()
        .map(|f| f.file_name().unwrap_or_default().to_string_lossy().into())
        .collect();
    Ok((dir, names, photos))
}

/// Photos held in memory; see the module doc.
pub struct PhotosDataset {
    split: Split,
    dir: PathBuf,
    names: Vec<String>,
    photos: Vec<U8Image>,
    len: usize,
    transform: ImageTransform,
}

impl PhotosDataset {
    /// Loads `<photos folder>/{train,heldout}` ([`DataConfig::bundled_dir`]; compact form,
    /// cached).
    pub fn open(cfg: &DataConfig, split: Split, transform: ImageTransform) -> Result<Self> {
        // the data root under which the photos were found (data.root, $MIMLAB_DATA, checkout)
        let photos = cfg.bundled_dir("photos")?;
        let root = photos.parent().unwrap_or(&photos);
        let (dir, names, photos) = load_photos(root, split)?;
        let natural = match split {
            Split::Train => cfg.photos_crops_per_epoch,
            Split::Eval => photos.len(),
        };
        let len = subset::select(cfg, split, natural, None)?.len();
        Ok(Self {
            split,
            dir,
            names,
            photos,
            len,
            transform,
        })
    }

    /// File names of the photos, in photo order.
    pub fn names(&self) -> &[String] {
        &self.names
    }

    /// The in-memory (compact) photos.
    pub fn photos(&self) -> &[U8Image] {
        &self.photos
    }
}

impl Dataset for PhotosDataset {
    fn len(&self) -> usize {
        self.len
    }

    fn get(&self, index: usize, rng: &mut StdRng) -> Result<Sample> {
        if index >= self.len {
            bail!(
                "{}: index {index} out of range ({} samples)",
                self.describe(),
                self.len
            );
        }
        let img = &self.photos[index % self.photos.len()];
        self.transform.apply_with_target(img, &Target::None, rng)
    }

    fn channels(&self) -> usize {
        self.transform.in_chans
    }

    fn num_classes(&self) -> Option<usize> {
        None
    }

    fn class_names(&self) -> Option<Vec<String>> {
        None
    }

    fn describe(&self) -> String {
        let t = &self.transform;
        let what = match self.split {
            Split::Train => format!("{} random crops of {} photos", self.len, self.photos.len()),
            Split::Eval => format!("{} held-out photos", self.len),
        };
        format!(
            "photos {} ({}): {what}, served {}x{}x{}",
            self.split.name(),
            self.dir.display(),
            t.in_chans,
            t.size,
            t.size
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::folder::tests::write_png;
    use crate::data::{build_dataset, heldout_images, test_data_root};
    use crate::rng::rng_for;

    #[test]
    fn compact_cache_is_written_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("big.png");
        write_png(&src, 1024, 600, [10, 20, 30]);
        let cache = dir.path().join("c/big.png.png");
        let a = load_compact(&src, &cache).unwrap();
        assert_eq!((a.width, a.height, a.channels), (512, 300, 3));
        assert!(cache.is_file());
        assert_eq!(load_compact(&src, &cache).unwrap(), a);
        assert_eq!(&a.data[..3], &[10, 20, 30]);
    }

    #[test]
    fn synthetic_photos_train_and_heldout() {
        let dir = tempfile::tempdir().unwrap();
        write_png(&dir.path().join("photos/train/a.png"), 64, 48, [255, 0, 0]);
        write_png(&dir.path().join("photos/train/b.png"), 48, 64, [0, 255, 0]);
        write_png(
            &dir.path().join("photos/heldout/h.png"),
            40,
            40,
            [0, 0, 255],
        );
        let cfg = DataConfig {
            dataset: "photos".into(),
            root: dir.path().into(),
            photos_crops_per_epoch: 10,
            ..Default::default()
        };
        let ds = build_dataset(&cfg, Split::Train, 16, 3, true).unwrap();
        assert_eq!(ds.len(), 10);
        assert_eq!((ds.num_classes(), ds.channels()), (None, 3));
        let s = ds.get(3, &mut rng_for(0, &[])).unwrap();
        // index 3 -> photo 3 % 2 = b.png (green): channel 1 is (1 - 0.456) / 0.224 everywhere.
        let g = (1.0 - 0.456) / 0.224;
        assert!(s.image[256..512].iter().all(|v| (v - g).abs() < 1e-5));
        let h = heldout_images(&cfg, 16, 3, 8).unwrap();
        assert_eq!(h.dims(), &[1, 3, 16, 16]);
    }

    #[test]
    fn real_photos_load_in_compact_form() {
        let root = test_data_root();
        let probe = root.join("photos/heldout");
        assert!(
            probe.is_dir(),
            "{} not found: run scripts/setup-data.sh",
            probe.display()
        );
        let cfg = DataConfig {
            dataset: "photos".into(),
            root,
            ..Default::default()
        };
        let t = ImageTransform::new(32, 3, false, &cfg.aug).unwrap();
        let ds = PhotosDataset::open(&cfg, Split::Eval, t).unwrap();
        assert_eq!(
            ds.names(),
            ["LadyBird.jpg", "astronaut.png", "chelsea.png", "coffee.png"]
        );
        assert!(
            ds.photos()
                .iter()
                .all(|p| p.width.max(p.height) == COMPACT_SIDE
                    || p.width.max(p.height) < COMPACT_SIDE)
        );
        // astronaut is 512x512 already; chelsea 451x300 stays as it is.
        assert_eq!((ds.photos()[1].width, ds.photos()[1].height), (512, 512));
        assert_eq!((ds.photos()[2].width, ds.photos()[2].height), (451, 300));
        let h = heldout_images(&cfg, 32, 3, 4).unwrap();
        assert_eq!(h.dims(), &[4, 3, 32, 32]);
    }
}
