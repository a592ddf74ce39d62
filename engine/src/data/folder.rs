//! Image files on disk: decoding (JPEG/PNG) and the `image-folder` (one sub-folder per class,
//! sorted names = class ids, as torchvision's ImageFolder) and `folder` (flat or nested,
//! unlabelled) datasets. Files are decoded on every `get`, on the loader's worker threads.
use std::collections::HashSet;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};
use rand::rngs::StdRng;

use super::transforms::{ImageTransform, U8Image};
use super::{subset, DataConfig, Dataset, Sample, Split, Target};

/// File extensions served (lower case).
pub const IMAGE_EXTENSIONS: [&str; 3] = ["jpg", "jpeg", "png"];

/// An undecodable image the dataset was told to skip (`data.skip_bad_images`); the loader drops
/// the sample, warns and counts it.
#[derive(Debug, thiserror::Error)]
#[error("{path}: cannot decode image: {reason}")]
pub struct SkippedImage {
    /// The file at fault.
    pub path: PathBuf,
    /// The decoder's message.
    pub reason: String,
}

/// Decodes a JPEG/PNG file into grey (1 channel, when the file has no colour) or RGB (3 channels;
/// alpha is dropped as PIL's `convert("RGB")` does).
pub fn decode_image(path: &Path) -> Result<U8Image> {
    let img = image::ImageReader::open(path)
        .with_context(|| format!("opening {}", path.display()))?
        .with_guessed_format()
        .with_context(|| format!("reading {}", path.display()))?
        .decode()
        .with_context(|| format!("{}: cannot decode image", path.display()))?;
    let (w, h) = (img.width() as usize, img.height() as usize);
    Ok(if img.color().has_color() {
        U8Image {
            width: w,
            height: h,
            channels: 3,
            data: img.into_rgb8().into_raw(),
        }
    } else {
        U8Image {
            width: w,
            height: h,
            channels: 1,
            data: img.into_luma8().into_raw(),
        }
    })
}

/// PNG file bytes of `img` (grey or RGB, 8 bit), deterministic: the same image always gives the
/// same bytes (generated datasets rely on it).
pub fn encode_png(img: &U8Image) -> Result<Vec<u8>> {
    let mut out = Vec::new();
    let mut enc = png::Encoder::new(&mut out, img.width as u32, img.height as u32);
    enc.set_color(if img.channels == 3 {
        png::ColorType::Rgb
    } else {
        png::ColorType::Grayscale
    });
    enc.set_depth(png::BitDepth::Eight);
    let mut writer = enc.write_header().context("writing PNG header")?;
    writer
        .write_image_data(&img.data)
        .context("writing PNG data")?;
    writer.finish().context("finishing PNG")?;
    Ok(out)
}

fn is_image(p: &Path) -> bool {
    p.extension()
        .and_then(|e| e.to_str())
        .is_some_and(|e| IMAGE_EXTENSIONS.contains(&e.to_ascii_lowercase().as_str()))
}

/// Image files under `dir`, recursively, in sorted path order (hidden entries skipped).
///
/// A directory reached a second time (a symlink loop, or two links to one folder) is listed once;
/// each link skipped that way gets a warning on stderr.
pub fn list_images(dir: &Path) -> Result<Vec<PathBuf>> {
    let (files, skipped) = walk_images(dir)?;
    for link in skipped {
        eprintln!(
            "warning: {}: skipped, it leads to a folder already listed (a directory link loop?)",
            link.display()
        );
    }
    Ok(files)
}

/// The image files under `dir` and the directory paths skipped because their folder (by
/// canonical path) was already walked.
fn walk_images(dir: &Path) -> Result<(Vec<PathBuf>, Vec<PathBuf>)> {
    let mut files = Vec::new();
    let mut skipped = Vec::new();
    let mut visited = HashSet::new();
    let canonical = dir
        .canonicalize()
        .with_context(|| format!("listing {}", dir.display()))?;
    visited.insert(canonical);
    walk_into(dir, &mut visited, &mut files, &mut skipped)?;
    Ok((files, skipped))
}

fn walk_into(
    dir: &Path,
    visited: &mut HashSet<PathBuf>,
    files: &mut Vec<PathBuf>,
    skipped: &mut Vec<PathBuf>,
) -> Result<()> {
    let mut entries: Vec<PathBuf> = std::fs::read_dir(dir)
        .with_context(|| format!("listing {}", dir.display()))?
        .map(|e| e.map(|e| e.path()))
        .collect::<std::io::Result<_>>()
        .with_context(|| format!("listing {}", dir.display()))?;
    entries.sort();
    for p in entries {
        if p.file_name()
            .and_then(|n| n.to_str())
            .is_some_and(|n| n.starts_with('.'))
        {
            continue;
        }
        if p.is_dir() {
            let canonical = p
                .canonicalize()
                .with_context(|| format!("listing {}", p.display()))?;
            if visited.insert(canonical) {
                walk_into(&p, visited, files, skipped)?;
            } else {
                skipped.push(p);
            }
        } else if is_image(&p) {
            files.push(p);
        }
    }
    Ok(())
}

/// Images from a folder, with class labels (`image-folder`) or without (`folder`).
pub struct FolderDataset {
    kind: &'static str,
    dir: PathBuf,
    split: Split,
    files: Vec<PathBuf>,
    labels: Option<Vec<u32>>,
    classes: Option<Vec<String>>,
    total: usize,
    skip_bad: bool,
    transform: ImageTransform,
}

impl FolderDataset {
    /// Opens `cfg.path` (train) or `cfg.eval_path` (eval); `labelled` = image-folder layout.
    pub fn open(
        cfg: &DataConfig,
        split: Split,
        transform: ImageTransform,
        labelled: bool,
    ) -> Result<Self> {
        let kind = if labelled { "image-folder" } else { "folder" };
        let (dir, key) = match split {
            Split::Train => (&cfg.path, "data.path"),
            Split::Eval => (&cfg.eval_path, "data.eval_path"),
        };
        let Some(dir) = dir else {
            bail!(
                "{key} is not set: the {kind} dataset needs its {} folder",
                split.name()
            );
        };
        if !dir.is_dir() {
            bail!("{key}: {} is not a folder", dir.display());
        }
        let (files, labels, classes) = if labelled {
            let mut class_dirs: Vec<PathBuf> = std::fs::read_dir(dir)
                .with_context(|| format!("listing {}", dir.display()))?
                .filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.is_dir())
                .filter(|p| {
                    !p.file_name()
                        .and_then(|n| n.to_str())
                        .is_some_and(|n| n.starts_with('.'))
                })
                .collect();
            class_dirs.sort();
            if class_dirs.is_empty() {
                bail!(
                    "{}: no class sub-folders (image-folder wants one per class)",
                    dir.display()
                );
            }
            let mut files = Vec::new();
            let mut labels = Vec::new();
            let mut names = Vec::new();
            for (c, cd) in class_dirs.iter().enumerate() {
                let f = list_images(cd)?;
                labels.extend(std::iter::repeat_n(c as u32, f.len()));
                files.extend(f);
                names.push(
                    cd.file_name()
                        .map(|n| n.to_string_lossy().into_owned())
                        .unwrap_or_default(),
                );
            }
            (files, Some(labels), Some(names))
        } else {
            (list_images(dir)?, None, None)
        };
        if files.is_empty() {
            bail!("{}: no .jpg/.jpeg/.png images", dir.display());
        }
        let total = files.len();
        let keep = subset::select(cfg, split, total, labels.as_deref())?;
        let files = keep.iter().map(|&i| files[i].clone()).collect();
        let labels = labels.map(|l| keep.iter().map(|&i| l[i]).collect());
        Ok(Self {
            kind,
            dir: dir.clone(),
            split,
            files,
            labels,
            classes,
            total,
            skip_bad: cfg.skip_bad_images,
            transform,
        })
    }

    /// The served files, in index order.
    pub fn files(&self) -> &[PathBuf] {
        &self.files
    }
}

impl Dataset for FolderDataset {
    fn len(&self) -> usize {
        self.files.len()
    }

    fn get(&self, index: usize, rng: &mut StdRng) -> Result<Sample> {
        let Some(path) = self.files.get(index) else {
            bail!(
                "{}: index {index} out of range ({} samples)",
                self.describe(),
                self.len()
            );
        };
        let img = match decode_image(path) {
            Ok(img) => img,
            Err(e) if self.skip_bad => {
                let reason = format!("{:#}", e.root_cause());
                return Err(SkippedImage {
                    path: path.clone(),
                    reason,
                }
                .into());
            }
            Err(e) => return Err(e),
        };
        let target = match &self.labels {
            Some(l) => Target::Class(l[index]),
            None => Target::None,
        };
        self.transform.apply_with_target(&img, &target, rng)
    }

    fn channels(&self) -> usize {
        self.transform.in_chans
    }

    fn num_classes(&self) -> Option<usize> {
        self.classes.as_ref().map(|c| c.len())
    }

    fn class_names(&self) -> Option<Vec<String>> {
        self.classes.clone()
    }

    fn describe(&self) -> String {
        let t = &self.transform;
        let count = if self.files.len() == self.total {
            format!("{} images", self.total)
        } else {
            format!("{} of {} images", self.files.len(), self.total)
        };
        let classes = match &self.classes {
            Some(c) => format!(", {} classes", c.len()),
            None => String::new(),
        };
        format!(
            "{} {} ({}): {count}{classes}, served {}x{}x{}",
            self.kind,
            self.split.name(),
            self.dir.display(),
            t.in_chans,
            t.size,
            t.size
        )
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::data::build_dataset;
    use crate::rng::rng_for;

    /// Writes an RGB PNG filled with `v` (w x h).
    pub(crate) fn write_png(path: &Path, w: u32, h: u32, v: [u8; 3]) {
        std::fs::create_dir_all(path.parent().unwrap()).unwrap();
        image::RgbImage::from_pixel(w, h, image::Rgb(v))
            .save(path)
            .unwrap();
    }

    /// An image-folder with classes `cat` (3 images, one a corrupt JPEG) and `dog` (2 images).
    pub(crate) fn make_folder(root: &Path) -> PathBuf {
        write_png(&root.join("dog/a.png"), 10, 8, [0, 0, 255]);
        write_png(&root.join("dog/sub/b.png"), 10, 8, [0, 0, 200]);
        write_png(&root.join("cat/x.png"), 12, 9, [255, 0, 0]);
        write_png(&root.join("cat/z.PNG"), 9, 12, [200, 0, 0]);
        std::fs::write(
            root.join("cat/y.jpg"),
            b"\xff\xd8\xff\xe0 definitely not a jpeg",
        )
        .unwrap();
        std::fs::write(root.join("cat/notes.txt"), b"ignored").unwrap();
        root.join("cat/y.jpg")
    }

    #[test]
    fn image_folder_labels_sorted_classes_and_names_bad_file() {
        let dir = tempfile::tempdir().unwrap();
        let bad = make_folder(dir.path());
        let cfg = DataConfig {
            dataset: "image-folder".into(),
            path: Some(dir.path().into()),
            ..Default::default()
        };
        let ds = build_dataset(&cfg, Split::Train, 8, 3, false).unwrap();
        assert_eq!(ds.len(), 5);
        assert_eq!(ds.class_names().unwrap(), vec!["cat", "dog"]);
        let labels: Vec<_> = (0..5)
            .filter_map(|i| {
                ds.get(i, &mut rng_for(0, &[]))
                    .ok()
                    .map(|s| s.label().unwrap())
            })
            .collect();
        assert_eq!(
            labels,
            vec![0, 0, 1, 1],
            "cat/x, cat/z, dog/a, dog/sub/b (y.jpg fails)"
        );
        // Sorted order: cat/x.png, cat/y.jpg, cat/z.PNG -> index 1 is the corrupt file.
        let err = format!("{:#}", ds.get(1, &mut rng_for(0, &[])).unwrap_err());
        assert!(
            err.starts_with(&format!("{}: cannot decode image", bad.display())),
            "{err}"
        );
        let skip = DataConfig {
            skip_bad_images: true,
            ..cfg.clone()
        };
        let ds = build_dataset(&skip, Split::Train, 8, 3, false).unwrap();
        let e = ds.get(1, &mut rng_for(0, &[])).unwrap_err();
        assert_eq!(e.downcast_ref::<SkippedImage>().unwrap().path, bad);
        let err = build_dataset(&cfg, Split::Eval, 8, 3, false)
            .err()
            .unwrap()
            .to_string();
        assert_eq!(
            err,
            "data.eval_path is not set: the image-folder dataset needs its eval folder"
        );
    }

    #[test]
    fn a_directory_link_loop_is_listed_once_and_the_link_is_named() {
        // root/{a.png, sub/{b.png, c.png, up -> ..}}: following `up` again and again listed
        // these 3 files 123 times (until the path grew too long).
        let dir = tempfile::tempdir().unwrap();
        let root = dir.path().join("root");
        std::fs::create_dir_all(root.join("sub")).unwrap();
        for p in ["a.png", "sub/b.png", "sub/c.png"] {
            write_png(&root.join(p), 2, 2, [1, 2, 3]);
        }
        let up = root.join("sub/up");
        std::os::unix::fs::symlink("..", &up).unwrap();
        let (files, skipped) = walk_images(&root).unwrap();
        let expect: Vec<PathBuf> = ["a.png", "sub/b.png", "sub/c.png"]
            .iter()
            .map(|p| root.join(p))
            .collect();
        assert_eq!(files, expect);
        assert_eq!(skipped, vec![up]);
        assert_eq!(list_images(&root).unwrap(), expect);
    }

    #[test]
    fn flat_folder_is_unlabelled_and_recursive() {
        let dir = tempfile::tempdir().unwrap();
        make_folder(dir.path());
        let cfg = DataConfig {
            dataset: "folder".into(),
            path: Some(dir.path().into()),
            max_samples: Some(4),
            ..Default::default()
        };
        let ds = build_dataset(&cfg, Split::Train, 6, 1, true).unwrap();
        assert_eq!(ds.len(), 4);
        assert_eq!(ds.num_classes(), None);
        let s = ds.get(0, &mut rng_for(1, &[])).unwrap();
        assert_eq!((&s.target, s.image.len()), (&Target::None, 36));
        // A constant red image in grey: L = (255 * 19595 + 0x8000) >> 16 = 76.
        let aug = &cfg.aug;
        let mean = aug.mean.iter().sum::<f32>() / 3.0;
        let std = aug.std.iter().sum::<f32>() / 3.0;
        let want = (76.0 / 255.0 - mean) / std;
        assert!(
            s.image.iter().all(|v| (v - want).abs() < 1e-6),
            "{:?}",
            &s.image[..3]
        );
    }
}
