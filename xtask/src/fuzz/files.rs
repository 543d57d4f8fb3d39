//! Safetensors cases: one file of a real checkpoint (`model.safetensors` or
//! `trainer.safetensors` of the dense or the MoE base) mutated — its header length, a tensor's
//! dtype, shape or data offsets, a tensor removed or renamed, the metadata replaced, a header
//! byte or a data byte changed, NaN, infinities, negatives or huge counts written into a tensor,
//! the file truncated or extended — then loaded with `LanguageModel::load` and, when the trainer
//! state loads too, trained one step from it. The third file, `optimizer.safetensors` (written
//! by `AdamW::save`), is loaded with `AdamW::load` and stepped from.

use proptest::prelude::*;
use proptest::sample::{select, Index};
use serde_json::{json, Map, Value};

use super::base::{
    load_and_use, load_optimizer, BaseCheckpoint, CkptFile, Env, Verdict, Violation,
};

/// A safetensors file split into its header (parsed) and its data.
#[derive(Debug, Clone)]
pub struct Parsed {
    /// The header object (tensor entries and `__metadata__`).
    pub header: Map<String, Value>,
    /// Everything after the header.
    pub data: Vec<u8>,
}

/// Splits `bytes` (8-byte little-endian header length, JSON header, data); `None` when that
/// layout is already broken.
pub fn parse(bytes: &[u8]) -> Option<Parsed> {
    let n = u64::from_le_bytes(bytes.get(..8)?.try_into().ok()?);
    let end = 8usize.checked_add(usize::try_from(n).ok()?)?;
    let header: Value = serde_json::from_slice(bytes.get(8..end)?).ok()?;
    let Value::Object(header) = header else {
        return None;
    };
    Some(Parsed {
        header,
        data: bytes[end..].to_vec(),
    })
}

impl Parsed {
    /// The file again, with a correct header length.
    pub fn bytes(&self) -> Vec<u8> {
        let h = Value::Object(self.header.clone()).to_string();
        let mut out = (h.len() as u64).to_le_bytes().to_vec();
        out.extend_from_slice(h.as_bytes());
        out.extend_from_slice(&self.data);
        out
    }

    /// The tensor names, sorted.
    pub fn names(&self) -> Vec<String> {
        let mut v: Vec<String> = self
            .header
            .keys()
            .filter(|k| *k != "__metadata__")
            .cloned()
            .collect();
        v.sort();
        v
    }
}

/// A value written into a tensor's data.
#[derive(Debug, Clone, Copy)]
pub enum Special {
    /// NaN.
    Nan,
    /// +∞.
    Inf,
    /// −∞.
    NegInf,
    /// −1 (a negative second moment or count).
    MinusOne,
    /// 2^31 (a step count past i32).
    Pow31,
    /// The largest value of the dtype.
    Max,
}

/// One mutation of a safetensors file.
#[derive(Debug, Clone)]
pub enum FileEdit {
    /// The 8-byte header length set to this value.
    HeaderLen(u64),
    /// The header length off by this many bytes.
    HeaderLenBy(i64),
    /// A tensor's dtype string.
    Dtype(Index, &'static str),
    /// A tensor's dtype changed to another of the same width (the layout stays valid).
    SameWidthDtype(Index, Index),
    /// A tensor's shape changed to another of as many elements (the layout stays valid).
    Reshape(Index, Index),
    /// A tensor's shape.
    Shape(Index, Value),
    /// A tensor's data offsets.
    Offsets(Index, Value),
    /// A tensor's entry removed (its bytes stay).
    Remove(Index),
    /// A tensor's entry renamed.
    Rename(Index, &'static str),
    /// `__metadata__` replaced.
    Metadata(Value),
    /// A byte of the header text replaced.
    HeaderByte(Index, u8),
    /// A data byte xor-ed.
    DataByte(Index, u8),
    /// A value written at an element of a tensor, in its dtype.
    Value(Index, Index, Special),
    /// The file cut to a fraction of its length.
    Truncate(Index),
    /// Bytes added at the end.
    Append(Vec<u8>),
}

fn offsets_value() -> BoxedStrategy<Value> {
    let n = prop_oneof![
        3 => (0u64..2048).prop_map(Value::from),
        1 => select(vec![json!(u64::MAX), json!(1u64 << 40), json!(-1), json!(1.5), json!("0")]),
    ];
    prop_oneof![
        4 => (n.clone(), n.clone()).prop_map(|(a, b)| json!([a, b])),
        1 => n.clone().prop_map(|a| json!([a])),
        1 => (n.clone(), n.clone(), n).prop_map(|(a, b, c)| json!([a, b, c])),
        1 => Just(json!(null)),
    ]
    .boxed()
}

fn shape_value() -> BoxedStrategy<Value> {
    let dim = prop_oneof![
        4 => (0u64..40).prop_map(Value::from),
        1 => select(vec![
            json!(1u64 << 28),
            json!(1u64 << 31),
            json!(1_000_000_000_000u64),
            json!((1u64 << 60) - 3),
            json!(u64::MAX),
            json!(-1),
            json!(2.5),
        ]),
    ];
    prop_oneof![
        5 => proptest::collection::vec(dim, 0..4).prop_map(Value::Array),
        1 => Just(json!("16")),
        1 => Just(json!(null)),
    ]
    .boxed()
}

fn metadata_value() -> BoxedStrategy<Value> {
    select(vec![
        json!({"learned_positions": "false"}),
        json!({"learned_positions": "maybe", "format": "torchscale-rs checkpoint 99"}),
        json!({"model_class": "EncoderDecoder"}),
        json!({"learned_positions": true}),
        json!({"trainer.step": "-1"}),
        json!([]),
        json!("x"),
        json!(null),
        json!({}),
    ])
    .boxed()
}

/// A mutation of a safetensors file.
pub fn file_edit() -> BoxedStrategy<FileEdit> {
    let special = select(vec![
        Special::Nan,
        Special::Inf,
        Special::NegInf,
        Special::MinusOne,
        Special::Pow31,
        Special::Max,
    ]);
    let dtype = select(vec![
        "F32", "F16", "BF16", "F64", "I64", "I32", "U8", "U32", "I8", "BOOL", "F8_E4M3", "Q4", "",
    ]);
    let name = select(vec![
        "",
        "layers.9.extra.weight",
        "embed_tokens.weight",
        "num_updates",
        "trainer.step",
        "__metadata__x",
        "exp_avg.embed_tokens.weight",
    ]);
    prop_oneof![
        1 => select(vec![0u64, 1, 7, 1 << 32, u64::MAX, u64::MAX / 2, 100_000_001])
            .prop_map(FileEdit::HeaderLen),
        1 => select(vec![-9i64, -1, 1, 8]).prop_map(FileEdit::HeaderLenBy),
        1 => (any::<Index>(), dtype).prop_map(|(i, d)| FileEdit::Dtype(i, d)),
        3 => (any::<Index>(), any::<Index>()).prop_map(|(i, d)| FileEdit::SameWidthDtype(i, d)),
        3 => (any::<Index>(), any::<Index>()).prop_map(|(i, r)| FileEdit::Reshape(i, r)),
        1 => (any::<Index>(), shape_value()).prop_map(|(i, s)| FileEdit::Shape(i, s)),
        1 => (any::<Index>(), offsets_value()).prop_map(|(i, o)| FileEdit::Offsets(i, o)),
        1 => any::<Index>().prop_map(FileEdit::Remove),
        1 => (any::<Index>(), name).prop_map(|(i, n)| FileEdit::Rename(i, n)),
        1 => metadata_value().prop_map(FileEdit::Metadata),
        1 => (any::<Index>(), any::<u8>()).prop_map(|(i, b)| FileEdit::HeaderByte(i, b)),
        2 => (any::<Index>(), 1u8..=255).prop_map(|(i, b)| FileEdit::DataByte(i, b)),
        4 => (any::<Index>(), any::<Index>(), special)
            .prop_map(|(t, e, s)| FileEdit::Value(t, e, s)),
        1 => any::<Index>().prop_map(FileEdit::Truncate),
        1 => proptest::collection::vec(any::<u8>(), 1..16).prop_map(FileEdit::Append),
    ]
    .boxed()
}

/// The tensor entry `i` picks, as `(name, entry)`.
fn entry<'a>(p: &'a mut Parsed, i: &Index) -> Option<(String, &'a mut Map<String, Value>)> {
    let names = p.names();
    if names.is_empty() {
        return None;
    }
    let name = names[i.index(names.len())].clone();
    match p.header.get_mut(&name) {
        Some(Value::Object(m)) => Some((name, m)),
        _ => None,
    }
}

/// The bytes of `value` in `dtype` (`None` for dtypes without a special encoding here).
fn encode(dtype: &str, value: Special) -> Option<Vec<u8>> {
    use Special::*;
    Some(match dtype {
        "F32" => match value {
            Nan => f32::NAN,
            Inf => f32::INFINITY,
            NegInf => f32::NEG_INFINITY,
            MinusOne => -1.0,
            Pow31 => 2f32.powi(31),
            Max => f32::MAX,
        }
        .to_le_bytes()
        .to_vec(),
        "I64" => match value {
            Nan | Max => i64::MAX,
            Inf | Pow31 => 1 << 31,
            NegInf => i64::MIN,
            MinusOne => -1,
        }
        .to_le_bytes()
        .to_vec(),
        _ => return None,
    })
}

impl FileEdit {
    /// Applies the edit to `bytes`, in words.
    pub fn apply(&self, bytes: &mut Vec<u8>) -> String {
        let structured = |bytes: &mut Vec<u8>, f: &dyn Fn(&mut Parsed) -> String| -> String {
            match parse(bytes) {
                Some(mut p) => {
                    let words = f(&mut p);
                    *bytes = p.bytes();
                    words
                }
                None => "(layout already broken: edit skipped)".into(),
            }
        };
        match self {
            FileEdit::HeaderLen(n) => {
                if bytes.len() >= 8 {
                    bytes[..8].copy_from_slice(&n.to_le_bytes());
                }
                format!("header length = {n}")
            }
            FileEdit::HeaderLenBy(d) => {
                if bytes.len() >= 8 {
                    let n = u64::from_le_bytes(bytes[..8].try_into().unwrap());
                    bytes[..8].copy_from_slice(&n.wrapping_add_signed(*d).to_le_bytes());
                }
                format!("header length {d:+}")
            }
            FileEdit::Dtype(i, d) => structured(bytes, &|p| match entry(p, i) {
                Some((name, e)) => {
                    e.insert("dtype".into(), json!(d));
                    format!("{name}: dtype = {d}")
                }
                None => "no tensor".into(),
            }),
            FileEdit::SameWidthDtype(i, d) => structured(bytes, &|p| match entry(p, i) {
                Some((name, e)) => {
                    let old = e["dtype"].as_str().unwrap_or("").to_string();
                    let same: &[&str] = match old.as_str() {
                        "F32" | "I32" | "U32" => &["F32", "I32", "U32"],
                        "F64" | "I64" | "U64" => &["F64", "I64", "U64"],
                        "F16" | "BF16" | "I16" | "U16" => &["F16", "BF16", "I16", "U16"],
                        _ => &["U8", "I8", "BOOL"],
                    };
                    let to = same[d.index(same.len())];
                    e.insert("dtype".into(), json!(to));
                    format!("{name}: dtype {old} -> {to}")
                }
                None => "no tensor".into(),
            }),
            FileEdit::Reshape(i, r) => structured(bytes, &|p| match entry(p, i) {
                Some((name, e)) => {
                    let dims: Vec<u64> = e["shape"]
                        .as_array()
                        .map(|a| a.iter().filter_map(Value::as_u64).collect())
                        .unwrap_or_default();
                    let n: u64 = dims.iter().product();
                    let mut rev = dims.clone();
                    rev.reverse();
                    let mut one = dims.clone();
                    one.push(1);
                    let options = [vec![n], rev, vec![1, n], one, vec![]];
                    let to = &options[r.index(options.len())];
                    e.insert("shape".into(), json!(to));
                    format!("{name}: shape {dims:?} -> {to:?}")
                }
                None => "no tensor".into(),
            }),
            FileEdit::Shape(i, s) => structured(bytes, &|p| match entry(p, i) {
                Some((name, e)) => {
                    e.insert("shape".into(), s.clone());
                    format!("{name}: shape = {s}")
                }
                None => "no tensor".into(),
            }),
            FileEdit::Offsets(i, o) => structured(bytes, &|p| match entry(p, i) {
                Some((name, e)) => {
                    e.insert("data_offsets".into(), o.clone());
                    format!("{name}: data_offsets = {o}")
                }
                None => "no tensor".into(),
            }),
            FileEdit::Remove(i) => structured(bytes, &|p| match entry(p, i) {
                Some((name, _)) => {
                    p.header.remove(&name);
                    format!("{name}: entry removed")
                }
                None => "no tensor".into(),
            }),
            FileEdit::Rename(i, to) => structured(bytes, &|p| match entry(p, i) {
                Some((name, _)) => {
                    let v = p.header.remove(&name).unwrap_or(Value::Null);
                    p.header.insert(to.to_string(), v);
                    format!("{name}: renamed to `{to}`")
                }
                None => "no tensor".into(),
            }),
            FileEdit::Metadata(m) => structured(bytes, &|p| {
                p.header.insert("__metadata__".into(), m.clone());
                format!("__metadata__ = {m}")
            }),
            FileEdit::HeaderByte(i, b) => {
                let n = parse_len(bytes);
                if n == 0 {
                    return "no header".into();
                }
                let at = 8 + i.index(n);
                bytes[at] = *b;
                format!("header byte {at} = {b:#04x}")
            }
            FileEdit::DataByte(i, x) => {
                let start = 8 + parse_len(bytes);
                if start >= bytes.len() {
                    return "no data".into();
                }
                let at = start + i.index(bytes.len() - start);
                bytes[at] ^= x;
                format!("data byte {at} ^= {x:#04x}")
            }
            FileEdit::Value(t, e, v) => {
                let Some(p) = parse(bytes) else {
                    return "(layout already broken: edit skipped)".into();
                };
                let start = 8 + parse_len(bytes);
                let names = p.names();
                if names.is_empty() {
                    return "no tensor".into();
                }
                let name = &names[t.index(names.len())];
                let entry = &p.header[name];
                let dtype = entry["dtype"].as_str().unwrap_or("");
                let (Some(a), Some(b)) = (
                    entry["data_offsets"][0].as_u64(),
                    entry["data_offsets"][1].as_u64(),
                ) else {
                    return format!("{name}: no offsets");
                };
                let Some(enc) = encode(dtype, *v) else {
                    return format!("{name}: {dtype} not written");
                };
                let w = enc.len() as u64;
                if b <= a || (b - a) < w {
                    return format!("{name}: empty");
                }
                let k = e.index(((b - a) / w) as usize) as u64;
                let at = start + (a + k * w) as usize;
                if at + enc.len() <= bytes.len() {
                    bytes[at..at + enc.len()].copy_from_slice(&enc);
                }
                format!("{name}[{k}] = {v:?}")
            }
            FileEdit::Truncate(i) => {
                let n = i.index(bytes.len().max(1));
                bytes.truncate(n);
                format!("truncated to {n} bytes")
            }
            FileEdit::Append(extra) => {
                bytes.extend_from_slice(extra);
                format!("{} bytes appended", extra.len())
            }
        }
    }
}

/// The header length, when it fits in the file.
fn parse_len(bytes: &[u8]) -> usize {
    let Some(head) = bytes.get(..8) else { return 0 };
    let n = u64::from_le_bytes(head.try_into().unwrap());
    match usize::try_from(n) {
        Ok(n) if n <= bytes.len().saturating_sub(8) => n,
        _ => 0,
    }
}

/// One safetensors case.
#[derive(Debug, Clone)]
pub struct FileCase {
    /// Which base checkpoint (index into [`Env::bases`]).
    pub base: usize,
    /// Which of its files is mutated.
    pub file: CkptFile,
    /// The mutations, in order.
    pub edits: Vec<FileEdit>,
}

/// A safetensors case: a file of a base, 1 to 3 mutations.
pub fn case() -> BoxedStrategy<FileCase> {
    (
        0usize..2,
        select(vec![
            CkptFile::Model,
            CkptFile::Trainer,
            CkptFile::Optimizer,
        ]),
        proptest::collection::vec(file_edit(), 1..3),
    )
        .prop_map(|(base, file, edits)| FileCase { base, file, edits })
        .boxed()
}

/// The mutated bytes and the edits in words.
pub fn mutate(base: &BaseCheckpoint, case: &FileCase) -> (Vec<u8>, Vec<String>) {
    let mut bytes = base.bytes(case.file).to_vec();
    let words = case.edits.iter().map(|e| e.apply(&mut bytes)).collect();
    (bytes, words)
}

/// Describes the case (applying its edits to a copy of the base file).
pub fn describe(env: &Env, case: &FileCase) -> String {
    let base = &env.bases[case.base];
    let (_, words) = mutate(base, case);
    format!(
        "{} checkpoint, {} after [{}]",
        base.name,
        case.file.name(),
        words.join("; ")
    )
}

/// Writes the checkpoint with the mutated file and loads and uses it.
pub fn run(env: &Env, index: u64, case: &FileCase) -> std::result::Result<Verdict, Violation> {
    let base = &env.bases[case.base];
    let (bytes, _) = mutate(base, case);
    let dir = match env.case_dir(index) {
        Ok(d) => d.join("ckpt"),
        Err(e) => return Ok(Err(e)),
    };
    if let Err(e) = base.write(&dir, Some((case.file, &bytes))) {
        return Ok(Err(torchscale_core::Error::file_op("write", &dir, e)));
    }
    if case.file == CkptFile::Optimizer {
        load_optimizer(&dir)
    } else {
        load_and_use(&dir)
    }
}
