//! A TensorBoard event-file writer and reader of our own: TFRecord framing around hand-encoded
//! `tensorflow.Event` protobufs (scalars as `simple_value`, images as PNG `Summary.Image`, text
//! as a string tensor for the text plugin, hyperparameters as the hparams plugin's
//! `session_start_info`).
//!
//! Record framing (TensorFlow `core/lib/io/record_writer.cc`): u64 length (LE), masked crc32c of
//! the length bytes, data, masked crc32c of the data.

use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail, Context, Result};

use crate::picture::RgbImage;

/// TensorFlow's masked CRC32-C (`core/lib/hash/crc32c.h`: rotate right 15, add 0xa282ead8).
pub fn masked_crc32c(data: &[u8]) -> u32 {
    let crc = crc32c::crc32c(data);
    crc.rotate_right(15).wrapping_add(0xa282_ead8)
}

/// Appends a protobuf varint.
fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

/// Appends a field key (field number and wire type).
fn put_key(out: &mut Vec<u8>, field: u32, wire: u8) {
    put_varint(out, (u64::from(field) << 3) | u64::from(wire));
}

/// Appends a length-delimited field (strings, bytes, sub-messages).
fn put_bytes(out: &mut Vec<u8>, field: u32, bytes: &[u8]) {
    put_key(out, field, 2);
    put_varint(out, bytes.len() as u64);
    out.extend_from_slice(bytes);
}

/// `Event{wall_time=1 double, step=2 int64, <payload>}` where `payload` is already encoded.
fn encode_event(wall_time: f64, step: u64, payload: &[u8]) -> Vec<u8> {
    let mut ev = Vec::with_capacity(payload.len() + 16);
    put_key(&mut ev, 1, 1);
    ev.extend_from_slice(&wall_time.to_le_bytes());
    if step != 0 {
        put_key(&mut ev, 2, 0);
        put_varint(&mut ev, step);
    }
    ev.extend_from_slice(payload);
    ev
}

/// `Summary{value=1: Value{tag=1, <value>}}` as the Event's `summary=5` field.
fn encode_summary(tag: &str, value: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(tag.len() + value.len() + 8);
    put_bytes(&mut v, 1, tag.as_bytes());
    v.extend_from_slice(value);
    let mut summary = Vec::with_capacity(v.len() + 4);
    put_bytes(&mut summary, 1, &v);
    let mut field = Vec::with_capacity(summary.len() + 4);
    put_bytes(&mut field, 5, &summary);
    field
}

/// `tensorflow.DataType` values used here.
const DT_FLOAT: u64 = 1;
const DT_STRING: u64 = 7;
/// Tag of the hparams plugin's session start summary.
pub const HPARAMS_TAG: &str = "_hparams_/session_start_info";

/// A hyperparameter value (`google.protobuf.Value` number, string or bool).
#[derive(Debug, Clone, PartialEq)]
pub enum HValue {
    /// A number.
    Number(f64),
    /// A string (lists are written in YAML flow form).
    Text(String),
    /// A boolean.
    Bool(bool),
}

/// `Summary.Value.metadata = 9: SummaryMetadata{plugin_data = 1: {plugin_name = 1, content = 2}}`.
fn plugin_metadata(plugin: &str, content: &[u8]) -> Vec<u8> {
    let mut pd = Vec::new();
    put_bytes(&mut pd, 1, plugin.as_bytes());
    if !content.is_empty() {
        put_bytes(&mut pd, 2, content);
    }
    let mut meta = Vec::new();
    put_bytes(&mut meta, 1, &pd);
    let mut v = Vec::new();
    put_bytes(&mut v, 9, &meta);
    v
}

/// The leaves of a YAML config as `section.key` hyperparameters (numbers, strings, bools; lists
/// in flow form; nulls left out), in document order.
pub fn yaml_hparams(yaml: &str) -> Result<Vec<(String, HValue)>> {
    fn walk(prefix: &str, v: &serde_yaml_ng::Value, out: &mut Vec<(String, HValue)>) {
        use serde_yaml_ng::Value as Y;
        match v {
            Y::Mapping(m) => {
                for (k, v) in m {
                    let k = match k {
                        Y::String(s) => s.clone(),
                        other => serde_yaml_ng::to_string(other)
                            .unwrap_or_default()
                            .trim()
                            .to_string(),
                    };
                    let key = if prefix.is_empty() {
                        k
                    } else {
                        format!("{prefix}.{k}")
                    };
                    walk(&key, v, out);
                }
            }
            Y::Null => {}
            Y::Bool(b) => out.push((prefix.to_string(), HValue::Bool(*b))),
            Y::Number(n) => out.push((
                prefix.to_string(),
                HValue::Number(n.as_f64().unwrap_or(f64::NAN)),
            )),
            Y::String(s) => out.push((prefix.to_string(), HValue::Text(s.clone()))),
            Y::Sequence(_) | Y::Tagged(_) => {
                let flow = serde_json::to_string(v).unwrap_or_default();
                out.push((prefix.to_string(), HValue::Text(flow)));
            }
        }
    }
    let doc: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(yaml).context("reading the config for TensorBoard's hparams")?;
    let mut out = vec![];
    walk("", &doc, &mut out);
    Ok(out)
}

/// Seconds since the Unix epoch as a float (TensorBoard's `wall_time`).
fn now_secs() -> f64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0.0, |d| d.as_secs_f64())
}

/// This machine's host name (for the event file name), or "localhost".
fn host_name() -> String {
    let raw = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .ok()
        .or_else(|| std::env::var("HOSTNAME").ok())
        .unwrap_or_default();
    let clean: String = raw
        .trim()
        .chars()
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    if clean.is_empty() {
        "localhost".to_string()
    } else {
        clean
    }
}

/// Writes one TensorBoard event file.
pub struct TbWriter {
    path: PathBuf,
    out: BufWriter<File>,
}

impl TbWriter {
    /// Creates `dir/events.out.tfevents.<unix secs>.<host>.<pid>` (with a `.N` suffix when a
    /// writer of this process already made that name) and writes the `brain.Event:2` header.
    pub fn create(dir: &Path) -> Result<Self> {
        static COUNTER: AtomicU64 = AtomicU64::new(0);
        std::fs::create_dir_all(dir)
            .with_context(|| format!("{}: creating folder", dir.display()))?;
        let secs = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let base = format!(
            "events.out.tfevents.{secs}.{}.{}",
            host_name(),
            std::process::id()
        );
        let (path, file) = loop {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let name = if n == 0 {
                base.clone()
            } else {
                format!("{base}.{n}")
            };
            let path = dir.join(name);
            match File::options().write(true).create_new(true).open(&path) {
                Ok(f) => break (path, f),
                Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => continue,
                Err(e) => bail!("{}: cannot create: {e}", path.display()),
            }
        };
        let mut w = TbWriter {
            path,
            out: BufWriter::new(file),
        };
        let mut version = Vec::new();
        put_bytes(&mut version, 3, b"brain.Event:2");
        w.write_record(&encode_event(now_secs(), 0, &version))?;
        w.flush()?;
        Ok(w)
    }

    /// Frames and writes one record.
    fn write_record(&mut self, data: &[u8]) -> Result<()> {
        let len = (data.len() as u64).to_le_bytes();
        let write = |out: &mut BufWriter<File>| -> std::io::Result<()> {
            out.write_all(&len)?;
            out.write_all(&masked_crc32c(&len).to_le_bytes())?;
            out.write_all(data)?;
            out.write_all(&masked_crc32c(data).to_le_bytes())
        };
        write(&mut self.out).with_context(|| format!("{}: writing event", self.path.display()))
    }

    /// Logs a scalar (stored as a 32-bit float `simple_value`, as TensorBoard does).
    pub fn add_scalar(&mut self, tag: &str, value: f64, step: u64) -> Result<()> {
        let mut v = Vec::with_capacity(5);
        put_key(&mut v, 2, 5);
        v.extend_from_slice(&(value as f32).to_le_bytes());
        self.write_record(&encode_event(now_secs(), step, &encode_summary(tag, &v)))
    }

    /// Logs an RGB image (PNG-encoded, colorspace 3).
    pub fn add_image(&mut self, tag: &str, img: &RgbImage, step: u64) -> Result<()> {
        let png = img
            .encode_png()
            .with_context(|| format!("TensorBoard image `{tag}`"))?;
        let mut image = Vec::with_capacity(png.len() + 16);
        put_key(&mut image, 1, 0);
        put_varint(&mut image, u64::from(img.height));
        put_key(&mut image, 2, 0);
        put_varint(&mut image, u64::from(img.width));
        put_key(&mut image, 3, 0);
        put_varint(&mut image, 3);
        put_bytes(&mut image, 4, &png);
        let mut v = Vec::with_capacity(image.len() + 8);
        put_bytes(&mut v, 4, &image);
        self.write_record(&encode_event(now_secs(), step, &encode_summary(tag, &v)))
    }

    /// Logs markdown text (the text plugin: `Summary.Value{tag, metadata{plugin_data{"text"}},
    /// tensor{DT_STRING, string_val}}`, as `tensorboard.summary.text` writes it).
    pub fn add_text(&mut self, tag: &str, markdown: &str, step: u64) -> Result<()> {
        let mut tensor = Vec::with_capacity(markdown.len() + 16);
        put_key(&mut tensor, 1, 0);
        put_varint(&mut tensor, DT_STRING);
        put_bytes(&mut tensor, 2, &[]); // scalar shape
        put_bytes(&mut tensor, 8, markdown.as_bytes());
        let mut v = plugin_metadata("text", &[]);
        put_bytes(&mut v, 8, &tensor);
        self.write_record(&encode_event(now_secs(), step, &encode_summary(tag, &v)))
    }

    /// Logs the run's hyperparameters for the hparams plugin: one `session_start_info`
    /// (`tensorboard/plugins/hparams/plugin_data.proto`, version 0) under the tag
    /// `_hparams_/session_start_info`; TensorBoard builds the experiment table from the runs'
    /// session infos and takes the metrics from their scalars.
    pub fn add_hparams(&mut self, hparams: &[(String, HValue)]) -> Result<()> {
        let mut info = Vec::new();
        for (key, value) in hparams {
            // google.protobuf.Value
            let mut val = Vec::new();
            match value {
                HValue::Number(x) => {
                    put_key(&mut val, 2, 1);
                    val.extend_from_slice(&x.to_le_bytes());
                }
                HValue::Text(t) => put_bytes(&mut val, 3, t.as_bytes()),
                HValue::Bool(b) => {
                    put_key(&mut val, 4, 0);
                    put_varint(&mut val, u64::from(*b));
                }
            }
            let mut entry = Vec::new();
            put_bytes(&mut entry, 1, key.as_bytes());
            put_bytes(&mut entry, 2, &val);
            put_bytes(&mut info, 1, &entry); // map<string, Value> hparams = 1
        }
        put_key(&mut info, 5, 1); // start_time_secs
        info.extend_from_slice(&now_secs().to_le_bytes());
        let mut data = Vec::new();
        put_bytes(&mut data, 3, &info); // HParamsPluginData.session_start_info
        let mut v = plugin_metadata("hparams", &data);
        // an empty float tensor, as the hparams summary writes (`_TF_NULL_TENSOR`)
        let mut tensor = Vec::new();
        put_key(&mut tensor, 1, 0);
        put_varint(&mut tensor, DT_FLOAT);
        put_bytes(&mut tensor, 2, &[]);
        put_bytes(&mut v, 8, &tensor);
        self.write_record(&encode_event(
            now_secs(),
            0,
            &encode_summary(HPARAMS_TAG, &v),
        ))
    }

    /// Flushes buffered events to the file (TensorBoard sees them after this).
    pub fn flush(&mut self) -> Result<()> {
        self.out
            .flush()
            .with_context(|| format!("{}: flushing", self.path.display()))
    }

    /// The event file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TbWriter {
    fn drop(&mut self) {
        // Best effort: an error here has nowhere to go; explicit `flush` reports it.
        let _ = self.out.flush();
    }
}

/// One logged value read back from an event file.
#[derive(Debug, Clone, PartialEq)]
pub enum TbEvent {
    /// A scalar (`simple_value`).
    Scalar {
        /// Its tag.
        tag: String,
        /// Its step.
        step: u64,
        /// Its value (TensorBoard stores f32).
        value: f32,
    },
    /// An image (`Summary.Image`).
    Image {
        /// Its tag.
        tag: String,
        /// Its step.
        step: u64,
        /// Width in pixels.
        width: u32,
        /// Height in pixels.
        height: u32,
        /// The encoded image (PNG).
        png: Vec<u8>,
    },
    /// Text of the text plugin.
    Text {
        /// Its tag.
        tag: String,
        /// Its step.
        step: u64,
        /// The markdown.
        text: String,
    },
    /// The hparams plugin's session start: the hyperparameters.
    Hparams {
        /// Name and value of each.
        hparams: Vec<(String, HValue)>,
    },
}

/// A protobuf field value as read.
enum Field<'a> {
    Varint(u64),
    Fixed64(u64),
    Fixed32(u32),
    Bytes(&'a [u8]),
}

/// Iterates the fields of one protobuf message.
fn fields(mut buf: &[u8]) -> impl Iterator<Item = Result<(u64, Field<'_>)>> {
    fn varint(buf: &mut &[u8]) -> Result<u64> {
        let mut v = 0u64;
        for shift in (0..64).step_by(7) {
            let (&b, rest) = buf
                .split_first()
                .ok_or_else(|| anyhow!("truncated varint"))?;
            *buf = rest;
            v |= u64::from(b & 0x7f) << shift;
            if b & 0x80 == 0 {
                return Ok(v);
            }
        }
        bail!("varint longer than 10 bytes")
    }
    fn take<'a>(buf: &mut &'a [u8], n: usize) -> Result<&'a [u8]> {
        if buf.len() < n {
            bail!("field of {n} bytes past the end of the message");
        }
        let (head, rest) = buf.split_at(n);
        *buf = rest;
        Ok(head)
    }
    std::iter::from_fn(move || {
        if buf.is_empty() {
            return None;
        }
        let mut next = || -> Result<(u64, Field<'_>)> {
            let key = varint(&mut buf)?;
            let field = match key & 7 {
                0 => Field::Varint(varint(&mut buf)?),
                1 => Field::Fixed64(u64::from_le_bytes(take(&mut buf, 8)?.try_into()?)),
                2 => {
                    let n = varint(&mut buf)? as usize;
                    Field::Bytes(take(&mut buf, n)?)
                }
                5 => Field::Fixed32(u32::from_le_bytes(take(&mut buf, 4)?.try_into()?)),
                w => bail!("unsupported wire type {w}"),
            };
            Ok((key >> 3, field))
        };
        let item = next();
        if item.is_err() {
            buf = &[]; // stop after the first error
        }
        Some(item)
    })
}

/// Decodes the summaries of one Event message into `out`.
fn decode_event(data: &[u8], out: &mut Vec<TbEvent>) -> Result<()> {
    let mut step = 0u64;
    let mut summaries = Vec::new();
    for f in fields(data) {
        match f? {
            (2, Field::Varint(s)) => step = s,
            (5, Field::Bytes(b)) => summaries.push(b),
            _ => {}
        }
    }
    for summary in summaries {
        for f in fields(summary) {
            let (1, Field::Bytes(value)) = f? else {
                continue;
            };
            let mut tag = String::new();
            let mut scalar = None;
            let mut image = None;
            let mut plugin = (String::new(), &[][..]);
            let mut strings = vec![];
            for f in fields(value) {
                match f? {
                    (1, Field::Bytes(b)) => tag = String::from_utf8_lossy(b).into_owned(),
                    (2, Field::Fixed32(bits)) => scalar = Some(f32::from_bits(bits)),
                    (4, Field::Bytes(b)) => image = Some(b),
                    (9, Field::Bytes(meta)) => plugin = decode_plugin(meta)?,
                    (8, Field::Bytes(tensor)) => {
                        for f in fields(tensor) {
                            if let (8, Field::Bytes(b)) = f? {
                                strings.push(String::from_utf8_lossy(b).into_owned());
                            }
                        }
                    }
                    _ => {}
                }
            }
            match plugin.0.as_str() {
                "text" => out.push(TbEvent::Text {
                    tag: tag.clone(),
                    step,
                    text: strings.concat(),
                }),
                "hparams" => out.push(TbEvent::Hparams {
                    hparams: decode_hparams(plugin.1)?,
                }),
                _ => {}
            }
            if let Some(value) = scalar {
                out.push(TbEvent::Scalar {
                    tag: tag.clone(),
                    step,
                    value,
                });
            }
            if let Some(img) = image {
                let (mut width, mut height, mut png) = (0, 0, Vec::new());
                for f in fields(img) {
                    match f? {
                        (1, Field::Varint(h)) => height = h as u32,
                        (2, Field::Varint(w)) => width = w as u32,
                        (4, Field::Bytes(b)) => png = b.to_vec(),
                        _ => {}
                    }
                }
                out.push(TbEvent::Image {
                    tag,
                    step,
                    width,
                    height,
                    png,
                });
            }
        }
    }
    Ok(())
}

/// `(plugin_name, content)` of a `SummaryMetadata`.
fn decode_plugin(meta: &[u8]) -> Result<(String, &[u8])> {
    let (mut name, mut content) = (String::new(), &[][..]);
    for f in fields(meta) {
        if let (1, Field::Bytes(pd)) = f? {
            for f in fields(pd) {
                match f? {
                    (1, Field::Bytes(b)) => name = String::from_utf8_lossy(b).into_owned(),
                    (2, Field::Bytes(b)) => content = b,
                    _ => {}
                }
            }
        }
    }
    Ok((name, content))
}

/// The hyperparameters of an `HParamsPluginData.session_start_info`.
fn decode_hparams(data: &[u8]) -> Result<Vec<(String, HValue)>> {
    let mut out = vec![];
    for f in fields(data) {
        let (3, Field::Bytes(info)) = f? else {
            continue;
        };
        for f in fields(info) {
            let (1, Field::Bytes(entry)) = f? else {
                continue;
            };
            let (mut key, mut value) = (String::new(), None);
            for f in fields(entry) {
                match f? {
                    (1, Field::Bytes(b)) => key = String::from_utf8_lossy(b).into_owned(),
                    (2, Field::Bytes(v)) => {
                        for f in fields(v) {
                            value = match f? {
                                (2, Field::Fixed64(bits)) => {
                                    Some(HValue::Number(f64::from_bits(bits)))
                                }
                                (3, Field::Bytes(b)) => {
                                    Some(HValue::Text(String::from_utf8_lossy(b).into_owned()))
                                }
                                (4, Field::Varint(b)) => Some(HValue::Bool(b != 0)),
                                _ => value,
                            };
                        }
                    }
                    _ => {}
                }
            }
            if let Some(v) = value {
                out.push((key, v));
            }
        }
    }
    Ok(out)
}

/// Parses an event file back (verifies both CRCs; error names the file and record offset). Used
/// by tests and analysis notebooks.
pub fn read_events(path: &Path) -> Result<Vec<TbEvent>> {
    let bytes = std::fs::read(path).with_context(|| format!("{}: cannot read", path.display()))?;
    let mut events = Vec::new();
    let mut off = 0usize;
    while off < bytes.len() {
        let at = |msg: String| anyhow!("{}: record at offset {off}: {msg}", path.display());
        let header = bytes
            .get(off..off + 12)
            .ok_or_else(|| at("truncated header".into()))?;
        let (len_bytes, len_crc) = header.split_at(8);
        let stored = u32::from_le_bytes(len_crc.try_into()?);
        if masked_crc32c(len_bytes) != stored {
            return Err(at(format!("length CRC mismatch (stored {stored:#010x})")));
        }
        let len = usize::try_from(u64::from_le_bytes(len_bytes.try_into()?))?;
        let data = bytes
            .get(off + 12..off + 12 + len)
            .ok_or_else(|| at(format!("truncated data ({len} bytes)")))?;
        let crc = bytes
            .get(off + 12 + len..off + 16 + len)
            .ok_or_else(|| at("truncated data CRC".into()))?;
        let stored = u32::from_le_bytes(crc.try_into()?);
        if masked_crc32c(data) != stored {
            return Err(at(format!("data CRC mismatch (stored {stored:#010x})")));
        }
        decode_event(data, &mut events).map_err(|e| at(format!("bad Event protobuf: {e}")))?;
        off += 16 + len;
    }
    Ok(events)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn masked_crc_matches_tensorflow() {
        // CRC-32C check value of "123456789" is 0xe3069283; masked by hand (rotr 15 + 0xa282ead8).
        assert_eq!(crc32c::crc32c(b"123456789"), 0xe306_9283);
        assert_eq!(masked_crc32c(b"123456789"), 0xc78a_b0e5);
    }

    #[test]
    fn varint_encoding() {
        let mut v = Vec::new();
        put_varint(&mut v, 300);
        assert_eq!(v, vec![0xac, 0x02]);
    }

    #[test]
    fn scalars_and_image_round_trip() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = TbWriter::create(dir.path()).unwrap();
        let mut img = RgbImage::new(3, 2, [0, 100, 200]);
        img.put(1, 1, [255, 0, 0]);
        w.add_scalar("train/loss", 0.4312, 120).unwrap();
        w.add_image("recon", &img, 120).unwrap();
        w.add_scalar("train/lr", 1.2e-4, 121).unwrap();
        w.flush().unwrap();
        let events = read_events(w.path()).unwrap();
        assert_eq!(
            events,
            vec![
                TbEvent::Scalar {
                    tag: "train/loss".into(),
                    step: 120,
                    value: 0.4312
                },
                TbEvent::Image {
                    tag: "recon".into(),
                    step: 120,
                    width: 3,
                    height: 2,
                    png: img.encode_png().unwrap()
                },
                TbEvent::Scalar {
                    tag: "train/lr".into(),
                    step: 121,
                    value: 1.2e-4
                },
            ]
        );
        // The first record is the file_version header: 8+4 framing, then the Event bytes.
        let bytes = std::fs::read(w.path()).unwrap();
        let len = u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        assert!(bytes[12..12 + len].ends_with(b"brain.Event:2"));
    }

    #[test]
    fn text_and_hparams_round_trip_in_the_plugins_layout() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = TbWriter::create(dir.path()).unwrap();
        let yaml = "model:\n  preset: swinv2_nano\n  depths: [2, 2, 6]\n  ape: false\n\
                    train:\n  base_lr: 1.25e-3\n  max_steps: null\n";
        let hp = yaml_hparams(yaml).unwrap();
        assert_eq!(
            hp,
            vec![
                ("model.preset".into(), HValue::Text("swinv2_nano".into())),
                ("model.depths".into(), HValue::Text("[2,2,6]".into())),
                ("model.ape".into(), HValue::Bool(false)),
                ("train.base_lr".into(), HValue::Number(1.25e-3)),
            ]
        );
        w.add_text("config", "    a: 1", 0).unwrap();
        w.add_hparams(&hp).unwrap();
        w.flush().unwrap();
        let events = read_events(w.path()).unwrap();
        assert_eq!(
            events,
            vec![
                TbEvent::Text {
                    tag: "config".into(),
                    step: 0,
                    text: "    a: 1".into()
                },
                TbEvent::Hparams { hparams: hp }
            ]
        );
        // The hparams record carries the plugin name and tag TensorBoard looks for.
        let bytes = std::fs::read(w.path()).unwrap();
        let has = |needle: &[u8]| bytes.windows(needle.len()).any(|x| x == needle);
        assert!(has(HPARAMS_TAG.as_bytes()) && has(b"hparams") && has(b"text"));
    }

    #[test]
    fn two_writers_in_one_second_get_distinct_files() {
        let dir = tempfile::tempdir().unwrap();
        let a = TbWriter::create(dir.path()).unwrap();
        let b = TbWriter::create(dir.path()).unwrap();
        assert_ne!(a.path(), b.path());
        let name = a.path().file_name().unwrap().to_string_lossy().into_owned();
        assert!(name.starts_with("events.out.tfevents."), "{name}");
    }

    #[test]
    fn corrupted_byte_is_a_crc_error_naming_file_and_offset() {
        let dir = tempfile::tempdir().unwrap();
        let mut w = TbWriter::create(dir.path()).unwrap();
        w.add_scalar("a", 1.0, 1).unwrap();
        w.flush().unwrap();
        let path = w.path().to_path_buf();
        let mut bytes = std::fs::read(&path).unwrap();
        let first = 16 + u64::from_le_bytes(bytes[..8].try_into().unwrap()) as usize;
        let last = bytes.len() - 5; // a byte inside the second record's data
        bytes[last] ^= 0x01;
        std::fs::write(&path, &bytes).unwrap();
        let err = read_events(&path).unwrap_err().to_string();
        assert!(
            err.starts_with(&format!(
                "{}: record at offset {first}: data CRC mismatch",
                path.display()
            )),
            "{err}"
        );
    }
}
