//! Data stage, generated dataset `trees`: NEON aerial tree crowns (the deepforest 2.1.0 wheel's
//! data, MIT package, NEON imagery; scripts/setup-data.sh copies its 4 annotated PNGs and VOC
//! XMLs to `ROOT/neon-trees-raw/`) cut into fixed-size tiles with their boxes.
//!
//! - The image of `NAME.xml` is its `<filename>` in the folder, else `NAME.png` (OSBS_029.xml
//!   names a `.tif`; setup-data.sh copies the PNG of the same image).
//! - Tiles are `TILE x TILE` (320) px. Per axis an image of `L >= TILE` px gets `ceil(L / TILE)`
//!   tiles spread evenly from edge to edge (start `round(i * (L - TILE) / (n - 1))`), so the
//!   whole image is covered and neighbours overlap by the remainder (2299 px: 8 tiles, 37 px
//!   overlap; 400 px: 2 tiles, 240 px overlap). A side shorter than `TILE` is one tile of that side.
//! - A box is clipped to each tile it touches and kept there when the clipped part has at least
//!   half its area ([`tile_boxes`]: exactly half is kept); boxes in overlaps appear in each tile.
//! - Split by source image: validation = the `2019_YELL_2_541000_4977000_image_crop` tiles, train =
//!   the other three images' tiles (a held-out area, never a tile of a training image).
//! - One class, "Tree" (category id 1): SOAP_061's "Dead" and "Alive" crowns are trees too; the
//!   raw XMLs keep the distinction for whoever needs it.
//! - Written as COCO (`train.json`, `val.json`) + tile PNGs (`train/`, `val/`, named
//!   `<source>_<x>_<y>.png`) under `ROOT/trees/`, whole ([`crate::fsutil::create_dir_atomic`]).
use std::path::Path;

use anyhow::{bail, Context, Result};

use super::coco::{CocoAnnotation, CocoCategory, CocoFile, CocoImage};
use super::det_aug::DetTransform;
use super::detection::DetectionDataset;
use super::folder::{decode_image, encode_png};
use super::transforms::{crop, CropBox};
use super::voc::load_voc;
use super::{missing_bundled, DataConfig, Split};

/// Raw folder (setup-data.sh) under the data root.
pub const RAW: &str = "neon-trees-raw";
/// Tiled dataset folder under the data root.
pub const DIR: &str = "trees";
/// Tile side in pixels.
pub const TILE: usize = 320;
/// The source image whose tiles are the validation split.
pub const VAL_SOURCE: &str = "2019_YELL_2_541000_4977000_image_crop";

/// Tile starts along an axis of `len` px; see the module doc.
pub fn tile_starts(len: usize, tile: usize) -> Vec<usize> {
    if len <= tile {
        return vec![0];
    }
    let n = len.div_ceil(tile);
    (0..n)
        .map(|i| ((i * (len - tile)) as f64 / (n - 1) as f64).round() as usize)
        .collect()
}

/// The boxes (`[x1, y1, x2, y2]` in image pixels) that keep at least half their area inside the
/// tile `t`, clipped to it and moved to tile pixels.
pub fn tile_boxes(boxes: &[[f64; 4]], t: CropBox) -> Vec<[f64; 4]> {
    let (x0, y0) = (t.left as f64, t.top as f64);
    let (x1t, y1t) = (x0 + t.width as f64, y0 + t.height as f64);
    boxes
        .iter()
        .filter_map(|b| {
            let area = (b[2] - b[0]) * (b[3] - b[1]);
            let c = [b[0].max(x0), b[1].max(y0), b[2].min(x1t), b[3].min(y1t)];
            let (w, h) = (c[2] - c[0], c[3] - c[1]);
            (area > 0.0 && w > 0.0 && h > 0.0 && 2.0 * w * h >= area)
                .then(|| [c[0] - x0, c[1] - y0, c[2] - x0, c[3] - y0])
        })
        .collect()
}

/// What [`prepare`] made: (tiles, boxes) per split, and the source boxes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Prepared {
    /// False when `ROOT/trees` was already there (nothing written).
    pub created: bool,
    /// Boxes in the raw XMLs.
    pub source_boxes: usize,
    /// (tiles, boxes) of train.
    pub train: (usize, usize),
    /// (tiles, boxes) of val.
    pub val: (usize, usize),
}

/// Tiles `root/neon-trees-raw` into `root/trees` unless that exists.
pub fn prepare(root: &Path, tile: usize) -> Result<Prepared> {
    let raw = root.join(RAW);
    if !raw.is_dir() {
        return Err(missing_bundled(&raw));
    }
    let mut xmls: Vec<_> = std::fs::read_dir(&raw)
        .with_context(|| format!("listing {}", raw.display()))?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| p.extension().is_some_and(|e| e == "xml"))
        .collect();
    xmls.sort();
    if xmls.is_empty() {
        bail!(
            "{}: no VOC XML files: run scripts/setup-data.sh",
            raw.display()
        );
    }
    let mut files = [CocoFile::default(), CocoFile::default()];
    for f in &mut files {
        f.categories = vec![CocoCategory {
            id: 1,
            name: "Tree".into(),
            supercategory: None,
        }];
    }
    let mut source_boxes = 0;
    let created = crate::fsutil::create_dir_atomic(&root.join(DIR), |tmp| {
        for name in ["train", "val"] {
            std::fs::create_dir_all(tmp.join(name))?;
        }
        for xml in &xmls {
            let voc = load_voc(xml)?;
            let stem = xml.file_stem().unwrap_or_default().to_string_lossy();
            // OSBS_029.xml names the wheel's OSBS_029.tif; the PNG of the same stem is that image.
            let named = raw.join(&voc.filename);
            let path = if named.is_file() {
                named
            } else {
                raw.join(format!("{stem}.png"))
            };
            let img =
                decode_image(&path).with_context(|| format!("tile source of {}", xml.display()))?;
            let boxes: Vec<[f64; 4]> = voc.objects.iter().map(|o| o.xyxy).collect();
            source_boxes += boxes.len();
            let (k, name) = if stem == VAL_SOURCE {
                (1, "val")
            } else {
                (0, "train")
            };
            let file = &mut files[k];
            for &top in &tile_starts(img.height, tile) {
                for &left in &tile_starts(img.width, tile) {
                    let t = CropBox {
                        top,
                        left,
                        height: tile.min(img.height),
                        width: tile.min(img.width),
                    };
                    let file_name = format!("{stem}_{left}_{top}.png");
                    let png = encode_png(&crop(&img, t))?;
                    std::fs::write(tmp.join(name).join(&file_name), png)?;
                    let image_id = file.images.len() as u64 + 1;
                    file.images.push(CocoImage {
                        id: image_id,
                        file_name,
                        width: t.width as u32,
                        height: t.height as u32,
                    });
                    for b in tile_boxes(&boxes, t) {
                        file.annotations.push(CocoAnnotation {
                            id: file.annotations.len() as u64 + 1,
                            image_id,
                            category_id: 1,
                            bbox: [b[0], b[1], b[2] - b[0], b[3] - b[1]],
                            area: None,
                            iscrowd: false,
                            ignore: None,
                            segmentation: None,
                        });
                    }
                }
            }
        }
        for (f, name) in files.iter().zip(["train", "val"]) {
            f.check()?;
            std::fs::write(tmp.join(format!("{name}.json")), serde_json::to_vec(f)?)?;
        }
        Ok(())
    })?;
    let count = |f: &CocoFile| (f.images.len(), f.annotations.len());
    Ok(Prepared {
        created,
        source_boxes,
        train: count(&files[0]),
        val: count(&files[1]),
    })
}

/// Opens `split` of `root/trees`, tiling `root/neon-trees-raw` first when it is missing.
pub fn open(cfg: &DataConfig, split: Split, t: DetTransform) -> Result<DetectionDataset> {
    let root = cfg.generated_root(DIR, RAW)?;
    let dir = root.join(DIR);
    if !dir.is_dir() {
        eprintln!("trees: {} not found, tiling {RAW} (once)", dir.display());
        prepare(&root, TILE)
            .context("tiling the NEON trees (or run `mimlab data prepare trees`)")?;
    }
    let name = match split {
        Split::Train => "train",
        Split::Eval => "val",
    };
    DetectionDataset::from_coco(
        DIR,
        split,
        &dir.join(format!("{name}.json")),
        &dir.join(name),
        None,
        cfg,
        t,
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::data::detection::tests::eval_transform;
    use crate::data::folder::tests::write_png;
    use crate::data::{test_data_root, Dataset};

    #[test]
    fn tile_starts_cover_the_image_evenly() {
        assert_eq!(tile_starts(320, 320), [0]);
        assert_eq!(tile_starts(200, 320), [0]);
        assert_eq!(tile_starts(400, 320), [0, 80]);
        assert_eq!(tile_starts(640, 320), [0, 320]);
        // 1035: 4 tiles, (1035 - 320) / 3 = 238.33 -> 0, 238, 477, 715.
        assert_eq!(tile_starts(1035, 320), [0, 238, 477, 715]);
    }

    #[test]
    fn tile_boxes_clip_and_keep_exactly_half() {
        let t = CropBox {
            top: 100,
            left: 0,
            height: 320,
            width: 320,
        };
        let boxes = [
            [10.0, 110.0, 30.0, 150.0],   // inside: moved up by 100
            [300.0, 110.0, 340.0, 120.0], // 20 of 40 columns inside: exactly half, kept
            [301.0, 110.0, 341.0, 120.0], // 19 of 40: dropped
            [5.0, 90.0, 15.0, 110.0],     // 10 of 20 rows inside: kept, clipped to y = 0
            [5.0, 89.5, 15.0, 109.5],     // 9.5 of 20: dropped
            [400.0, 110.0, 410.0, 120.0], // outside
        ];
        assert_eq!(
            tile_boxes(&boxes, t),
            vec![
                [10.0, 10.0, 30.0, 50.0],
                [300.0, 10.0, 320.0, 20.0],
                [5.0, 0.0, 15.0, 10.0],
            ]
        );
    }

    #[test]
    fn a_synthetic_big_image_tiles_into_exact_boxes_split_by_source() {
        let dir = tempfile::tempdir().unwrap();
        let raw = dir.path().join(RAW);
        // 40 x 30 "train" source tiled at 20: x starts 0, 20; y starts 0, 10.
        write_png(&raw.join("big.png"), 40, 30, [0, 90, 0]);
        write_png(&raw.join(format!("{VAL_SOURCE}.png")), 20, 20, [0, 90, 0]);
        let xml = |file: &str, objs: &[(&str, [u32; 4])]| {
            let o: String = objs
                .iter()
                .map(|(n, b)| {
                    format!(
                        "<object><name>{n}</name><bndbox><xmin>{}</xmin><ymin>{}</ymin>\
                         <xmax>{}</xmax><ymax>{}</ymax></bndbox></object>",
                        b[0], b[1], b[2], b[3]
                    )
                })
                .collect();
            format!("<annotation><filename>{file}</filename>{o}</annotation>")
        };
        std::fs::write(
            raw.join("big.xml"),
            xml(
                "big.png",
                &[("Tree", [16, 2, 24, 6]), ("Dead", [30, 22, 34, 26])],
            ),
        )
        .unwrap();
        std::fs::write(
            raw.join(format!("{VAL_SOURCE}.xml")),
            xml(&format!("{VAL_SOURCE}.png"), &[("Tree", [1, 1, 5, 5])]),
        )
        .unwrap();
        let p = prepare(dir.path(), 20).unwrap();
        // [16, 2, 24, 6] straddles x = 20 half and half: in tiles (0, 0) and (20, 0) as
        // [16, 2, 20, 6] and [0, 2, 4, 6]. [30, 22, 34, 26] lies in tiles (20, 10) only
        // (rows 10..30): [10, 12, 14, 16]. Tiles at y = 0 cover rows 0..20: not there.
        assert_eq!(
            p,
            Prepared {
                created: true,
                source_boxes: 3,
                train: (4, 3),
                val: (1, 1)
            }
        );
        let gt = CocoFile::load(&dir.path().join("trees/train.json")).unwrap();
        let names: Vec<&str> = gt.images.iter().map(|i| i.file_name.as_str()).collect();
        assert_eq!(
            names,
            [
                "big_0_0.png",
                "big_20_0.png",
                "big_0_10.png",
                "big_20_10.png"
            ]
        );
        let boxes: Vec<(u64, [f64; 4])> = gt
            .annotations
            .iter()
            .map(|a| (a.image_id, a.xyxy()))
            .collect();
        assert_eq!(
            boxes,
            [
                (1, [16.0, 2.0, 20.0, 6.0]),
                (2, [0.0, 2.0, 4.0, 6.0]),
                (4, [10.0, 12.0, 14.0, 16.0]),
            ]
        );
        assert_eq!(gt.categories.len(), 1, "Dead/Alive are trees");
        let cfg = DataConfig {
            root: dir.path().into(),
            ..Default::default()
        };
        let ds = open(&cfg, Split::Eval, eval_transform(20)).unwrap();
        assert_eq!((ds.len(), ds.stats().boxes), (1, 1));
        assert_eq!(ds.class_names().unwrap(), ["Tree"]);
    }

    #[test]
    fn neon_trees_from_the_wheel() {
        let root = test_data_root();
        let raw = root.join(RAW);
        if !raw.is_dir() {
            eprintln!(
                "skipped: {} not installed (run scripts/setup-data.sh)",
                raw.display()
            );
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        std::os::unix::fs::symlink(raw.canonicalize().unwrap(), dir.path().join(RAW)).unwrap();
        let p = prepare(dir.path(), TILE).unwrap();
        // 574 + 279 + 61 + 37 boxes (dense-tasks.md 4); tiles: 8 x 8 + 2 x 2 + 2 x 2 train,
        // 4 x 4 val.
        assert_eq!(p.source_boxes, 951);
        assert_eq!((p.train.0, p.val.0), (72, 16));
        eprintln!("trees: {p:?}");
    }
}
