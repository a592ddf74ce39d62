//! Data stage, dataset format: Pascal VOC annotation XML (`Annotations/*.xml`), as mmdetection's
//! `XMLDataset` reads it. Read once, checked once; the `voc` dataset (`detection.rs`) and the
//! trees tiler (`trees.rs`) work on these types.
//!
//! Conventions:
//! - `<bndbox>` corners are taken as written (mmdet 2+ subtracts nothing), as `[x1, y1, x2, y2]`
//!   pixels; float coordinates are accepted (labelme writes them).
//! - `<difficult>`: `1` marks a difficult object; an empty tag (`<difficult/>`, labelme) or none
//!   means 0. `<truncated/>`, `<pose/>` and other tags are ignored.
//! - `<size>` may be missing or 0 (some tools): the dataset then reads the image's header.
use std::path::Path;

use anyhow::{bail, Context, Result};

/// One `<object>`.
#[derive(Debug, Clone, PartialEq)]
pub struct VocObject {
    /// Class name (`<name>`).
    pub name: String,
    /// `[xmin, ymin, xmax, ymax]` as written.
    pub xyxy: [f64; 4],
    /// `<difficult>1</difficult>`.
    pub difficult: bool,
}

/// One annotation file.
#[derive(Debug, Clone, PartialEq)]
pub struct VocFile {
    /// `<filename>`: the image's name in `JPEGImages/`.
    pub filename: String,
    /// `<size><width>`, when present and positive.
    pub width: Option<u32>,
    /// `<size><height>`, when present and positive.
    pub height: Option<u32>,
    /// The objects, in file order.
    pub objects: Vec<VocObject>,
}

/// Reads and checks `path`; errors name the file (and the object's position for a bad box).
pub fn load_voc(path: &Path) -> Result<VocFile> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    parse_voc(&text).with_context(|| format!("{}: not a valid VOC annotation", path.display()))
}

/// The first child element `<tag>` of `n`.
fn child<'a, 'i>(n: roxmltree::Node<'a, 'i>, tag: &str) -> Option<roxmltree::Node<'a, 'i>> {
    n.children()
        .find(|c| c.is_element() && c.tag_name().name() == tag)
}

/// The trimmed text of the child `<tag>` of `n` ("" for an empty tag), `None` without one.
fn text_of(n: roxmltree::Node<'_, '_>, tag: &str) -> Option<String> {
    child(n, tag).map(|c| c.text().unwrap_or("").trim().to_string())
}

/// Parses the text of a VOC annotation file.
pub fn parse_voc(text: &str) -> Result<VocFile> {
    let doc = roxmltree::Document::parse(text)?;
    let root = doc.root_element();
    if root.tag_name().name() != "annotation" {
        bail!(
            "root element <{}>, expected <annotation>",
            root.tag_name().name()
        );
    }
    let filename = text_of(root, "filename")
        .filter(|f| !f.is_empty())
        .context("no <filename>")?;
    let size = |tag: &str| -> Result<Option<u32>> {
        let Some(s) = child(root, "size").and_then(|s| text_of(s, tag)) else {
            return Ok(None);
        };
        if s.is_empty() {
            return Ok(None);
        }
        let v: f64 = s
            .parse()
            .with_context(|| format!("<size><{tag}> `{s}` is not a number"))?;
        Ok((v >= 1.0).then_some(v as u32))
    };
    let (width, height) = (size("width")?, size("height")?);
    let mut objects = Vec::new();
    for (i, obj) in root
        .children()
        .filter(|c| c.is_element() && c.tag_name().name() == "object")
        .enumerate()
    {
        let name = text_of(obj, "name")
            .filter(|n| !n.is_empty())
            .with_context(|| format!("object {i}: no <name>"))?;
        let bb =
            child(obj, "bndbox").with_context(|| format!("object {i} ({name}): no <bndbox>"))?;
        let mut xyxy = [0.0; 4];
        for (v, tag) in xyxy.iter_mut().zip(["xmin", "ymin", "xmax", "ymax"]) {
            let s = text_of(bb, tag)
                .with_context(|| format!("object {i} ({name}): no <bndbox><{tag}>"))?;
            *v = s
                .parse::<f64>()
                .ok()
                .filter(|v| v.is_finite())
                .with_context(|| format!("object {i} ({name}): <{tag}> `{s}` is not a number"))?;
        }
        let difficult = match text_of(obj, "difficult").as_deref() {
            None | Some("") | Some("0") => false,
            Some("1") => true,
            Some(other) => bail!("object {i} ({name}): <difficult> `{other}` is not 0 or 1"),
        };
        objects.push(VocObject {
            name,
            xyxy,
            difficult,
        });
    }
    Ok(VocFile {
        filename,
        width,
        height,
        objects,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    // labelme's layout: float corners, empty <truncated/> and <difficult/> tags.
    const LABELME: &str = r#"<annotation>
  <folder/>
  <filename>2011_000003.jpg</filename>
  <size><height>338</height><width>500</width><depth>3</depth></size>
  <object>
    <name>person</name><pose/><truncated/><difficult/>
    <bndbox><xmin>191.0</xmin><ymin>107.36900369003689</ymin><xmax>313.0</xmax><ymax>329.36900369003695</ymax></bndbox>
  </object>
  <object>
    <name>bus</name><truncated>1</truncated><difficult>1</difficult>
    <bndbox><xmin>1</xmin><ymin>2</ymin><xmax>30</xmax><ymax>40</ymax></bndbox>
  </object>
</annotation>"#;

    #[test]
    fn reads_float_corners_empty_tags_and_difficult() {
        let v = parse_voc(LABELME).unwrap();
        assert_eq!(v.filename, "2011_000003.jpg");
        assert_eq!((v.width, v.height), (Some(500), Some(338)));
        assert_eq!(
            v.objects,
            vec![
                VocObject {
                    name: "person".into(),
                    xyxy: [191.0, 107.36900369003689, 313.0, 329.36900369003695],
                    difficult: false
                },
                VocObject {
                    name: "bus".into(),
                    xyxy: [1.0, 2.0, 30.0, 40.0],
                    difficult: true
                },
            ]
        );
        let no_size = parse_voc("<annotation><filename>a.png</filename></annotation>").unwrap();
        assert_eq!((no_size.width, no_size.objects.len()), (None, 0));
    }

    #[test]
    fn corrupt_files_are_errors_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let cases = [
            (
                LABELME.replace("</annotation>", ""),
                "not a valid VOC annotation",
            ),
            (
                LABELME.replace("<xmax>30</xmax>", "<xmax>3O</xmax>"),
                "object 1 (bus): <xmax> `3O`",
            ),
            (
                LABELME.replace("<ymin>2</ymin>", ""),
                "object 1 (bus): no <bndbox><ymin>",
            ),
            (
                LABELME.replace("<filename>2011_000003.jpg</filename>", ""),
                "no <filename>",
            ),
        ];
        for (i, (text, want)) in cases.iter().enumerate() {
            let p = dir.path().join(format!("bad{i}.xml"));
            std::fs::write(&p, text).unwrap();
            let err = format!("{:#}", load_voc(&p).unwrap_err());
            assert!(err.contains(want), "case {i}: {err}");
            assert!(err.contains(&format!("bad{i}.xml")), "case {i}: {err}");
        }
    }
}
