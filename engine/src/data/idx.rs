//! IDX datasets (Fashion-MNIST, MNIST): gzipped IDX files decoded once into memory as u8.
//!
//! Layout (datasets.md): big-endian header, magic `0 0 type ndims` with type 0x08 = u8, then
//! `ndims` u32 dimensions, then the data. Train = `train-*`, eval = `t10k-*`.
use std::io::Read;
use std::path::Path;

use anyhow::{bail, ensure, Context, Result};
use rand::rngs::StdRng;

use super::transforms::{CropBox, ImageTransform, U8Image};
use super::{missing_bundled, subset, DataConfig, Dataset, Sample, Split, Target};

/// An IDX array of u8.
#[derive(Debug, Clone, PartialEq)]
pub struct IdxArray {
    /// Dimensions from the header.
    pub dims: Vec<usize>,
    /// Row-major data, `dims.iter().product()` bytes.
    pub data: Vec<u8>,
}

/// Parses IDX bytes; `name` names the source in errors.
pub fn parse_idx(bytes: &[u8], name: &str) -> Result<IdxArray> {
    ensure!(
        bytes.len() >= 4,
        "{name}: {} bytes, too short for an IDX header",
        bytes.len()
    );
    ensure!(
        bytes[0] == 0 && bytes[1] == 0,
        "{name}: not an IDX file (magic {:02x?})",
        &bytes[..4]
    );
    ensure!(
        bytes[2] == 0x08,
        "{name}: IDX element type 0x{:02x}, only u8 (0x08) is read",
        bytes[2]
    );
    let ndims = bytes[3] as usize;
    let header = 4 + 4 * ndims;
    ensure!(
        bytes.len() >= header,
        "{name}: truncated IDX header ({ndims} dims)"
    );
    let dims: Vec<usize> = bytes[4..header]
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes([c[0], c[1], c[2], c[3]]) as usize)
        .collect();
    // Checked: a crafted header ([4, 2^31, 2^31]) wraps an unchecked product to 0.
    let Some(n) = dims.iter().try_fold(1usize, |n, &d| n.checked_mul(d)) else {
        bail!("{name}: IDX dims {dims:?} hold more elements than a usize counts");
    };
    ensure!(
        bytes.len() - header == n,
        "{name}: IDX dims {dims:?} need {n} bytes of data, found {}",
        bytes.len() - header
    );
    Ok(IdxArray {
        dims,
        data: bytes[header..].to_vec(),
    })
}

/// Reads an IDX file, gunzipping it when its name ends in `.gz`.
pub fn read_idx(path: &Path) -> Result<IdxArray> {
    let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
    let mut bytes = Vec::new();
    if path.extension().is_some_and(|e| e == "gz") {
        flate2::read::GzDecoder::new(std::io::BufReader::new(file))
            .read_to_end(&mut bytes)
            .with_context(|| format!("{}: gunzip failed", path.display()))?;
    } else {
        std::io::BufReader::new(file)
            .read_to_end(&mut bytes)
            .with_context(|| format!("reading {}", path.display()))?;
    }
    parse_idx(&bytes, &path.display().to_string())
}

/// Fashion-MNIST class names, in label order.
pub const FASHION_MNIST_CLASSES: [&str; 10] = [
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
];

/// A grey IDX image set with labels, held in memory.
pub struct IdxDataset {
    name: String,
    split: Split,
    images: Vec<u8>,
    labels: Vec<u8>,
    height: usize,
    width: usize,
    total: usize,
    keep: Vec<usize>,
    num_classes: usize,
    transform: ImageTransform,
}

impl IdxDataset {
    /// Opens `<dataset folder>/{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`
    /// ([`DataConfig::bundled_dir`]).
    pub fn open(cfg: &DataConfig, split: Split, transform: ImageTransform) -> Result<Self> {
        let dir = cfg.bundled_dir(&cfg.dataset)?;
        let prefix = match split {
            Split::Train => "train",
            Split::Eval => "t10k",
        };
        let img_path = dir.join(format!("{prefix}-images-idx3-ubyte.gz"));
        let lbl_path = dir.join(format!("{prefix}-labels-idx1-ubyte.gz"));
        for p in [&img_path, &lbl_path] {
            if !p.is_file() {
                return Err(missing_bundled(p));
            }
        }
        let images = read_idx(&img_path)?;
        let labels = read_idx(&lbl_path)?;
        Self::from_arrays(&cfg.dataset, split, images, labels, cfg, transform)
            .with_context(|| format!("{} and {}", img_path.display(), lbl_path.display()))
    }

    /// Builds the dataset from parsed arrays (`[n, h, w]` images, `[n]` labels).
    pub fn from_arrays(
        name: &str,
        split: Split,
        images: IdxArray,
        labels: IdxArray,
        cfg: &DataConfig,
        transform: ImageTransform,
    ) -> Result<Self> {
        let &[n, height, width] = images.dims.as_slice() else {
            bail!("images have IDX dims {:?}, expected [n, h, w]", images.dims);
        };
        ensure!(
            labels.dims == [n],
            "labels have IDX dims {:?}, expected [{n}]",
            labels.dims
        );
        let num_classes = labels
            .data
            .iter()
            .map(|l| *l as usize + 1)
            .max()
            .unwrap_or(0);
        let as_u32: Vec<u32> = labels.data.iter().map(|l| *l as u32).collect();
        let keep = subset::select(cfg, split, n, Some(&as_u32))?;
        Ok(Self {
            name: name.to_string(),
            split,
            images: images.data,
            labels: labels.data,
            height,
            width,
            total: n,
            keep,
            num_classes,
            transform,
        })
    }

    /// Label of served sample `index` (no decoding).
    pub fn label(&self, index: usize) -> u32 {
        self.labels[self.keep[index]] as u32
    }
}

impl Dataset for IdxDataset {
    fn len(&self) -> usize {
        self.keep.len()
    }

    fn get(&self, index: usize, rng: &mut StdRng) -> Result<Sample> {
        let Some(&i) = self.keep.get(index) else {
            bail!(
                "{}: index {index} out of range ({} samples)",
                self.describe(),
                self.len()
            );
        };
        let px = self.height * self.width;
        let img = U8Image {
            width: self.width,
            height: self.height,
            channels: 1,
            data: self.images[i * px..(i + 1) * px].to_vec(),
        };
        self.transform
            .apply_with_target(&img, &Target::Class(self.labels[i] as u32), rng)
    }

    fn crop_params(&self, index: usize, rng: &mut StdRng) -> Result<Option<(CropBox, bool)>> {
        ensure!(
            index < self.len(),
            "{}: index {index} out of range ({} samples)",
            self.describe(),
            self.len()
        );
        Ok(self
            .transform
            .train
            .then(|| self.transform.train_params(self.height, self.width, rng)))
    }

    fn channels(&self) -> usize {
        self.transform.in_chans
    }

    fn num_classes(&self) -> Option<usize> {
        Some(self.num_classes)
    }

    fn class_names(&self) -> Option<Vec<String>> {
        Some(match self.name.as_str() {
            "fashion-mnist" if self.num_classes <= 10 => FASHION_MNIST_CLASSES[..self.num_classes]
                .iter()
                .map(|s| s.to_string())
                .collect(),
            _ => (0..self.num_classes).map(|c| c.to_string()).collect(),
        })
    }

    fn describe(&self) -> String {
        let t = &self.transform;
        let count = if self.keep.len() == self.total {
            format!("{} images", self.total)
        } else {
            format!("{} of {} images", self.keep.len(), self.total)
        };
        format!(
            "{} {}: {count}, {} classes, served {}x{}x{}",
            self.name,
            self.split.name(),
            self.num_classes,
            t.in_chans,
            t.size,
            t.size
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::{build_dataset, test_data_root, AugConfig};
    use crate::rng::rng_for;
    use std::io::Write;

    fn idx_bytes(dims: &[u32], data: &[u8]) -> Vec<u8> {
        let mut b = vec![0, 0, 0x08, dims.len() as u8];
        for d in dims {
            b.extend_from_slice(&d.to_be_bytes());
        }
        b.extend_from_slice(data);
        b
    }

    #[test]
    fn dims_whose_product_overflows_are_an_error_naming_the_file() {
        // 4 * 2^31 * 2^31 = 2^64: a wrapping product reads it as 0 bytes of data.
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("train-images-idx3-ubyte");
        std::fs::write(&path, idx_bytes(&[4, 1 << 31, 1 << 31], &[])).unwrap();
        let err = read_idx(&path).unwrap_err().to_string();
        assert_eq!(
            err,
            format!(
                "{}: IDX dims [4, 2147483648, 2147483648] hold more elements than a usize counts",
                path.display()
            )
        );
    }

    #[test]
    fn parses_hand_made_idx_plain_and_gz() {
        let bytes = idx_bytes(&[2, 2, 3], &[1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]);
        let a = parse_idx(&bytes, "x").unwrap();
        assert_eq!(a.dims, vec![2, 2, 3]);
        assert_eq!(a.data[11], 12);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("t.gz");
        let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        gz.write_all(&bytes).unwrap();
        std::fs::write(&p, gz.finish().unwrap()).unwrap();
        assert_eq!(read_idx(&p).unwrap(), a);
        let err = parse_idx(&bytes[..16], "short.idx")
            .unwrap_err()
            .to_string();
        assert_eq!(
            err,
            "short.idx: IDX dims [2, 2, 3] need 12 bytes of data, found 0"
        );
        let err = parse_idx(&bytes[..15], "short.idx")
            .unwrap_err()
            .to_string();
        assert_eq!(err, "short.idx: truncated IDX header (3 dims)");
        let mut f32_type = bytes.clone();
        f32_type[2] = 0x0D;
        assert!(parse_idx(&f32_type, "f")
            .unwrap_err()
            .to_string()
            .contains("0x0d"));
    }

    #[test]
    fn tiny_idx_dataset_serves_pixels_and_labels() {
        // 3 images of 2x2: image k is constant 100*k; labels 2, 0, 1.
        let px: Vec<u8> = (0..3).flat_map(|k| [100 * k as u8; 4]).collect();
        let images = parse_idx(&idx_bytes(&[3, 2, 2], &px), "i").unwrap();
        let labels = parse_idx(&idx_bytes(&[3], &[2, 0, 1]), "l").unwrap();
        let aug = AugConfig {
            mean: vec![0.0],
            std: vec![1.0],
            ..Default::default()
        };
        let cfg = DataConfig {
            aug: aug.clone(),
            ..Default::default()
        };
        let t = ImageTransform::new(4, 3, false, &aug).unwrap();
        let ds = IdxDataset::from_arrays("tiny", Split::Eval, images, labels, &cfg, t).unwrap();
        assert_eq!((ds.len(), ds.num_classes(), ds.channels()), (3, Some(3), 3));
        let s = ds.get(2, &mut rng_for(0, &[])).unwrap();
        assert_eq!(s.label(), Some(1));
        assert_eq!(s.image, vec![200.0 / 255.0; 48]);
        assert_eq!(
            ds.describe(),
            "tiny eval: 3 images, 3 classes, served 3x4x4"
        );
        assert!(ds.get(3, &mut rng_for(0, &[])).is_err());
    }

    fn fashion_cfg() -> DataConfig {
        let root = test_data_root();
        let probe = root.join("fashion-mnist/train-images-idx3-ubyte.gz");
        assert!(
            probe.is_file(),
            "{} not found: run scripts/setup-data.sh",
            probe.display()
        );
        DataConfig {
            root,
            ..Default::default()
        }
    }

    #[test]
    fn real_fashion_mnist_has_6000_per_class() {
        let cfg = fashion_cfg();
        let t = ImageTransform::new(28, 1, false, &cfg.aug).unwrap();
        let ds = IdxDataset::open(&cfg, Split::Train, t).unwrap();
        assert_eq!(ds.len(), 60000);
        let mut counts = [0usize; 10];
        (0..ds.len()).for_each(|i| counts[ds.label(i) as usize] += 1);
        assert_eq!(counts, [6000; 10]);
        assert_eq!(ds.class_names().unwrap()[9], "Ankle boot");
        let eval = build_dataset(&cfg, Split::Eval, 32, 3, false).unwrap();
        assert_eq!(
            eval.describe(),
            "fashion-mnist eval: 10000 images, 10 classes, served 3x32x32"
        );
    }

    #[test]
    fn real_mnist_counts_and_heldout_images() {
        let cfg = DataConfig {
            dataset: "mnist".into(),
            ..fashion_cfg()
        };
        let t = ImageTransform::new(28, 1, false, &cfg.aug).unwrap();
        let ds = IdxDataset::open(&cfg, Split::Train, t).unwrap();
        let mut counts = [0usize; 10];
        (0..ds.len()).for_each(|i| counts[ds.label(i) as usize] += 1);
        // datasets.md A2: the standard MNIST train class counts.
        assert_eq!(
            counts,
            [5923, 6742, 5958, 6131, 5842, 5421, 5918, 6265, 5851, 5949]
        );
        // Held-out images = the first n eval images under the eval transform.
        let h = crate::data::heldout_images(&cfg, 32, 1, 3).unwrap();
        assert_eq!(h.dims(), &[3, 1, 32, 32]);
        let eval = build_dataset(&cfg, Split::Eval, 32, 1, false).unwrap();
        let second = eval.get(1, &mut rng_for(9, &[])).unwrap().image;
        let got = h
            .get(1)
            .unwrap()
            .flatten_all()
            .unwrap()
            .to_vec1::<f32>()
            .unwrap();
        assert_eq!(got, second);
    }

    #[test]
    fn label_fraction_keeps_60_per_class_seeded() {
        let cfg = DataConfig {
            label_fraction: 0.01,
            ..fashion_cfg()
        };
        let open = || {
            let t = ImageTransform::new(28, 1, true, &cfg.aug).unwrap();
            IdxDataset::open(&cfg, Split::Train, t).unwrap()
        };
        let (a, b) = (open(), open());
        assert_eq!(a.len(), 600);
        let mut counts = [0usize; 10];
        (0..a.len()).for_each(|i| counts[a.label(i) as usize] += 1);
        assert_eq!(counts, [60; 10]);
        assert_eq!(a.keep, b.keep, "same subset every time");
        // Eval is never subsampled.
        let t = ImageTransform::new(28, 1, false, &cfg.aug).unwrap();
        assert_eq!(IdxDataset::open(&cfg, Split::Eval, t).unwrap().len(), 10000);
    }

    #[test]
    fn missing_files_say_run_setup() {
        let cfg = DataConfig {
            root: "no/such/dir".into(),
            ..Default::default()
        };
        let err = build_dataset(&cfg, Split::Train, 28, 1, true)
            .err()
            .unwrap()
            .to_string();
        let checkout = crate::data::checkout_dir();
        for want in [
            "dataset folder `fashion-mnist` not found; looked in:".to_string(),
            "\n  no/such/dir/fashion-mnist (data.root) (from the working directory ".into(),
            format!(
                "\n  {} (the checkout mimlab was built from)",
                checkout.join("no/such/dir/fashion-mnist").display()
            ),
            "\nfix: run scripts/setup-data.sh in the mimlab checkout, or point data.root (or \
             MIMLAB_DATA) at the folder that holds `fashion-mnist/`"
                .into(),
        ] {
            assert!(err.contains(&want), "missing {want:?} in:\n{err}");
        }
        // A folder without the files still says which file and how to fix it.
        let dir = tempfile::tempdir().unwrap();
        std::fs::create_dir(dir.path().join("mnist")).unwrap();
        let cfg = DataConfig {
            root: dir.path().into(),
            dataset: "mnist".into(),
            ..Default::default()
        };
        let err = build_dataset(&cfg, Split::Train, 28, 1, true)
            .err()
            .unwrap()
            .to_string();
        let want = format!(
            "{} not found: run scripts/setup-data.sh",
            dir.path()
                .join("mnist/train-images-idx3-ubyte.gz")
                .display()
        );
        assert_eq!(err, want);
    }
}
