//! One TensorBoard event file: TFRecord framing around serialized `tensorboard.Event` protos,
//! written through a buffer. TensorBoard reads every file in a folder whose name holds
//! `tfevents`, in name order, so each process writes its own file and a resumed run's file
//! sorts after the earlier ones.
//!
//! The few messages needed are written here by hand as prost structs; their field numbers are
//! those of TensorBoard's `event.proto`, `summary.proto` and `tensor.proto` (checked against the
//! descriptors in the `tensorboard` Python package). A proto `oneof` is, on the wire, just its
//! members, so `Event.what` and `Summary.Value.value` are plain optional fields: the one that is
//! set is written even when it holds zero, which is what a reader needs to see the value.

use std::fs::{File, OpenOptions};
use std::io::{self, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::time::{Instant, SystemTime, UNIX_EPOCH};

use prost::Message;

/// `tensorboard.Event`.
#[derive(Clone, PartialEq, Message)]
pub struct Event {
    /// Seconds since the Unix epoch.
    #[prost(double, tag = "1")]
    pub wall_time: f64,
    /// The x coordinate of the values.
    #[prost(int64, tag = "2")]
    pub step: i64,
    /// Only in a file's first event: `brain.Event:2`.
    #[prost(string, optional, tag = "3")]
    pub file_version: Option<String>,
    /// Values at this step.
    #[prost(message, optional, tag = "5")]
    pub summary: Option<Summary>,
    /// A (re)start: readers drop what earlier files logged at this step or later.
    #[prost(message, optional, tag = "7")]
    pub session_log: Option<SessionLog>,
}

/// `tensorboard.SessionLog`.
#[derive(Clone, PartialEq, Message)]
pub struct SessionLog {
    /// [`SESSION_START`], …
    #[prost(int32, tag = "1")]
    pub status: i32,
}

/// `SessionLog.SessionStatus.START`.
pub const SESSION_START: i32 = 1;

/// `tensorboard.Summary`.
#[derive(Clone, PartialEq, Message)]
pub struct Summary {
    /// The values.
    #[prost(message, repeated, tag = "1")]
    pub value: Vec<Value>,
}

/// `tensorboard.Summary.Value`: one tagged value.
#[derive(Clone, PartialEq, Message)]
pub struct Value {
    /// The series' name (`epoch/test_loss`).
    #[prost(string, tag = "1")]
    pub tag: String,
    /// A scalar.
    #[prost(float, optional, tag = "2")]
    pub simple_value: Option<f32>,
    /// A tensor (for text: a string scalar).
    #[prost(message, optional, tag = "8")]
    pub tensor: Option<TensorProto>,
    /// Which plugin shows the tensor.
    #[prost(message, optional, tag = "9")]
    pub metadata: Option<SummaryMetadata>,
}

/// `tensorboard.SummaryMetadata`.
#[derive(Clone, PartialEq, Message)]
pub struct SummaryMetadata {
    /// The plugin.
    #[prost(message, optional, tag = "1")]
    pub plugin_data: Option<PluginData>,
}

/// `tensorboard.SummaryMetadata.PluginData`.
#[derive(Clone, PartialEq, Message)]
pub struct PluginData {
    /// `text`, `scalars`, …
    #[prost(string, tag = "1")]
    pub plugin_name: String,
    /// The plugin's own settings (empty for text).
    #[prost(bytes = "vec", tag = "2")]
    pub content: Vec<u8>,
}

/// `tensorboard.TensorProto`, as far as a string tensor needs it.
#[derive(Clone, PartialEq, Message)]
pub struct TensorProto {
    /// `tensorboard.DataType`: [`DT_STRING`].
    #[prost(int32, tag = "1")]
    pub dtype: i32,
    /// The shape: no dimensions for a scalar.
    #[prost(message, optional, tag = "2")]
    pub tensor_shape: Option<TensorShapeProto>,
    /// The strings, in row-major order.
    #[prost(bytes = "vec", repeated, tag = "8")]
    pub string_val: Vec<Vec<u8>>,
}

/// `tensorboard.TensorShapeProto` of a scalar (no dimensions).
#[derive(Clone, PartialEq, Message)]
pub struct TensorShapeProto {}

/// `tensorboard.DataType.DT_STRING`.
pub const DT_STRING: i32 = 7;

/// CRC-32C (Castagnoli), the checksum TFRecord uses.
const CRC32C: crc::Crc<u32> = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);

/// TFRecord's masked CRC-32C of `bytes`: rotated and offset, so that a CRC of data that itself
/// holds CRCs is not trivially zero.
pub fn masked_crc32c(bytes: &[u8]) -> u32 {
    CRC32C
        .checksum(bytes)
        .rotate_right(15)
        .wrapping_add(0xa282_ead8)
}

/// One TFRecord: the length (u64, little-endian), its masked CRC, the data and its masked CRC.
pub fn record(data: &[u8]) -> Vec<u8> {
    let len = (data.len() as u64).to_le_bytes();
    let mut out = Vec::with_capacity(data.len() + 16);
    out.extend_from_slice(&len);
    out.extend_from_slice(&masked_crc32c(&len).to_le_bytes());
    out.extend_from_slice(data);
    out.extend_from_slice(&masked_crc32c(data).to_le_bytes());
    out
}

/// An event at `step`, stamped now.
pub fn event(step: u64) -> Event {
    Event {
        wall_time: SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0.0, |d| d.as_secs_f64()),
        step: i64::try_from(step).unwrap_or(i64::MAX),
        ..Event::default()
    }
}

/// A scalar value.
pub fn scalar(tag: &str, value: f64) -> Value {
    Value {
        tag: tag.to_string(),
        simple_value: Some(value as f32),
        ..Value::default()
    }
}

/// A text value, which TensorBoard's text dashboard renders as Markdown.
pub fn text(tag: &str, markdown: &str) -> Value {
    Value {
        tag: tag.to_string(),
        tensor: Some(TensorProto {
            dtype: DT_STRING,
            tensor_shape: Some(TensorShapeProto {}),
            string_val: vec![markdown.as_bytes().to_vec()],
        }),
        metadata: Some(SummaryMetadata {
            plugin_data: Some(PluginData {
                plugin_name: "text".to_string(),
                content: Vec::new(),
            }),
        }),
        ..Value::default()
    }
}

/// How long written events may sit in the buffer before a write flushes them, so that a
/// TensorBoard watching the run is at most this far behind between epochs.
const FLUSH_AFTER: std::time::Duration = std::time::Duration::from_secs(10);

/// An open event file.
pub struct EventFile {
    path: PathBuf,
    out: BufWriter<File>,
    flushed: Instant,
}

impl EventFile {
    /// Creates a new event file in `dir` (created if need be), named
    /// `events.out.tfevents.<unix seconds>.<host>.<pid>.<n>` with the seconds past those of any
    /// event file already there, and writes its version record.
    pub fn create(dir: &Path) -> io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let now = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_secs());
        let secs = now.max(newest_seconds(dir).map_or(0, |s| s + 1));
        let host = hostname();
        let pid = std::process::id();
        let mut n = 0;
        let (path, file) = loop {
            let path = dir.join(format!("events.out.tfevents.{secs}.{host}.{pid}.{n}"));
            match OpenOptions::new().write(true).create_new(true).open(&path) {
                Ok(file) => break (path, file),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists && n < 100 => n += 1,
                Err(e) => return Err(e),
            }
        };
        let mut file = Self {
            path,
            out: BufWriter::new(file),
            flushed: Instant::now(),
        };
        file.write(&Event {
            file_version: Some("brain.Event:2".to_string()),
            ..event(0)
        })?;
        Ok(file)
    }

    /// An event file over `file` at `path`, as is (for tests of failing writes).
    #[cfg(test)]
    pub fn over(path: &Path, file: File) -> Self {
        Self {
            path: path.to_path_buf(),
            out: BufWriter::new(file),
            flushed: Instant::now(),
        }
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `event`; flushes if the buffer has held events for a while.
    pub fn write(&mut self, event: &Event) -> io::Result<()> {
        self.out.write_all(&record(&event.encode_to_vec()))?;
        if self.flushed.elapsed() >= FLUSH_AFTER {
            self.flush()?;
        }
        Ok(())
    }

    /// Writes what the buffer holds to the file.
    pub fn flush(&mut self) -> io::Result<()> {
        self.flushed = Instant::now();
        self.out.flush()
    }
}

/// The largest `<unix seconds>` in the names of the event files in `dir`.
fn newest_seconds(dir: &Path) -> Option<u64> {
    std::fs::read_dir(dir)
        .ok()?
        .filter_map(|entry| {
            let name = entry.ok()?.file_name();
            let rest = name.to_str()?.strip_prefix("events.out.tfevents.")?;
            rest.split('.').next()?.parse().ok()
        })
        .max()
}

/// This machine's name, as a file name may hold it.
fn hostname() -> String {
    let name: String = gethostname::gethostname()
        .to_string_lossy()
        .chars()
        .map(|c| match c {
            'a'..='z' | 'A'..='Z' | '0'..='9' | '-' | '_' | '.' => c,
            _ => '_',
        })
        .collect();
    if name.is_empty() {
        "localhost".to_string()
    } else {
        name
    }
}

/// The events in the file at `path`, checking each record's framing.
#[cfg(test)]
pub fn read_events(path: &Path) -> Vec<Event> {
    let data = std::fs::read(path).unwrap();
    let mut events = Vec::new();
    let mut rest = data.as_slice();
    while !rest.is_empty() {
        let len = u64::from_le_bytes(rest[..8].try_into().unwrap()) as usize;
        assert_eq!(rest[8..12], masked_crc32c(&rest[..8]).to_le_bytes());
        let body = &rest[12..12 + len];
        assert_eq!(rest[12 + len..16 + len], masked_crc32c(body).to_le_bytes());
        events.push(Event::decode(body).unwrap());
        rest = &rest[16 + len..];
    }
    events
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The bytes of `hex`.
    fn bytes(hex: &str) -> Vec<u8> {
        hex::decode(hex).unwrap()
    }

    #[test]
    fn crc32c_matches_the_published_check_values() {
        // The CRC catalogue's check value, and RFC 3720's 32 zero bytes.
        assert_eq!(CRC32C.checksum(b"123456789"), 0xe306_9283);
        assert_eq!(CRC32C.checksum(&[0u8; 32]), 0x8a91_36aa);
    }

    #[test]
    fn a_record_is_framed_as_tensorboards_own_writer_frames_it() {
        // tensorboard.summary.writer.record_writer.RecordWriter().write(b"lockstep").
        assert_eq!(
            record(b"lockstep"),
            bytes("0800000000000000ff86240f6c6f636b73746570d7adff72")
        );
        let empty = record(b"");
        assert_eq!(&empty[..8], &[0; 8]);
        assert_eq!(empty[12..], masked_crc32c(b"").to_le_bytes());
    }

    #[test]
    fn events_encode_as_tensorboards_protos_do_and_decode_back() {
        // The same events built with tensorboard.compat.proto's event_pb2 and serialized.
        let at = |step| Event {
            wall_time: 1.5,
            ..event(step)
        };
        let cases = [
            (
                Event {
                    file_version: Some("brain.Event:2".into()),
                    ..at(0)
                },
                "09000000000000f83f1a0d627261696e2e4576656e743a32",
            ),
            (
                // A zero scalar is still written: a reader must see the value.
                Event {
                    summary: Some(Summary {
                        value: vec![scalar("epoch/workers", 0.0)],
                    }),
                    ..at(7)
                },
                "09000000000000f83f10072a160a140a0d65706f63682f776f726b6572731500000000",
            ),
            (
                Event {
                    session_log: Some(SessionLog {
                        status: SESSION_START,
                    }),
                    ..at(3)
                },
                "09000000000000f83f10033a020801",
            ),
            (
                Event {
                    summary: Some(Summary {
                        value: vec![text("config", "hi")],
                    }),
                    ..at(0)
                },
                "09000000000000f83f2a1e0a1c0a06636f6e666967420808071200420268694a080a060a0474657874",
            ),
        ];
        for (event, hex) in cases {
            let encoded = event.encode_to_vec();
            assert_eq!(encoded, bytes(hex), "{event:?}");
            assert_eq!(Event::decode(encoded.as_slice()).unwrap(), event);
        }
    }

    #[test]
    fn a_later_file_sorts_after_the_earlier_ones_and_starts_with_the_version() {
        let dir = tempfile::tempdir().unwrap();
        // An earlier file stamped ahead of this clock (it went back, or the same second).
        let ahead = SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap()
            .as_secs()
            + 100;
        let earlier = dir
            .path()
            .join(format!("events.out.tfevents.{ahead}.elsewhere.99999.0"));
        std::fs::write(&earlier, b"").unwrap();
        let mut file = EventFile::create(dir.path()).unwrap();
        file.write(&Event {
            summary: Some(Summary {
                value: vec![scalar("step/loss", 0.25)],
            }),
            ..event(50)
        })
        .unwrap();
        file.flush().unwrap();
        let name = file.path().file_name().unwrap().to_str().unwrap();
        let expected = format!("events.out.tfevents.{}.", ahead + 1);
        assert!(name.starts_with(&expected), "{name}");
        assert!(file.path() > earlier.as_path());

        let events = read_events(file.path());
        assert_eq!(events.len(), 2);
        assert_eq!(events[0].file_version.as_deref(), Some("brain.Event:2"));
        assert_eq!(events[1].step, 50);
        assert_eq!(
            events[1].summary.as_ref().unwrap().value[0].simple_value,
            Some(0.25)
        );
    }
}
