//! Config JSON cases: a small valid Decoder, Encoder or EncoderDecoder config, then a few
//! mutations — a field set to a huge, negative, fractional or wrongly typed value, removed or
//! renamed, an unknown key added, the extension fields (`layer_techniques`, `moe_layers`,
//! `moe_router`, `moe_layer_routers`) given broken entries — and sometimes an edit of the text
//! itself (`NaN`, `1e999`, an integer past u64, a truncation). The text is parsed, finalized,
//! built and run on a few tokens (a forward pass, in training mode or not, and two incremental
//! steps for a decoder).

use proptest::prelude::*;
use proptest::sample::{select, Index};
use serde_json::{json, Map, Value};

use candle_core::{DType, Device, Tensor};
use torchscale_core::init::ParamStore;
use torchscale_core::Result;
use torchscale_models::config::{DecoderConfig, EncoderConfig, EncoderDecoderConfig};
use torchscale_models::decoder::{Decoder, DecoderInputs, IncrementalState};
use torchscale_models::encoder::{Encoder, EncoderInputs};
use torchscale_models::encoder_decoder::EncoderDecoder;

use super::base::{build_options, Verdict};

/// Which config struct a text is read as.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `DecoderConfig`.
    Decoder,
    /// `EncoderConfig`.
    Encoder,
    /// `EncoderDecoderConfig`.
    EncoderDecoder,
}

/// One config case.
#[derive(Debug, Clone)]
pub struct ConfigCase {
    /// The struct it is read as.
    pub kind: Kind,
    /// The JSON text.
    pub text: String,
    /// The forward pass in training mode.
    pub train: bool,
    /// The edits that made `text` from its base, in words.
    pub edits: Vec<String>,
}

impl std::fmt::Display for ConfigCase {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{:?} config (train: {}) after [{}]: {}",
            self.kind,
            self.train,
            self.edits.join("; "),
            self.text
        )
    }
}

/// The small valid configs mutations start from.
pub fn bases(kind: Kind) -> Vec<Value> {
    let moe_router = json!({"kind": "dropless", "k": 1});
    let expert_choice =
        json!({"layer": 1, "router": {"kind": "expert_choice", "capacity_factor": 1.0}});
    match kind {
        Kind::Decoder => {
            let plain = json!({
                "decoder_embed_dim": 16, "decoder_attention_heads": 2,
                "decoder_ffn_embed_dim": 32, "decoder_layers": 2, "vocab_size": 20,
                "max_target_positions": 16,
            });
            let mut moe = plain.clone();
            merge(
                &mut moe,
                json!({
                    "moe_freq": 1, "moe_expert_count": 2, "moe_layers": [1],
                    "moe_router": moe_router, "moe_layer_routers": [expert_choice],
                    "layer_techniques": [{"layers": [0, 1], "technique": "post_ln"}],
                }),
            );
            let mut xpos = plain.clone();
            merge(
                &mut xpos,
                json!({"xpos_rel_pos": true, "xpos_scale_base": 512, "rel_pos_buckets": 8,
                       "max_rel_pos": 16, "deepnorm": true, "multiway": true}),
            );
            vec![plain, moe, xpos]
        }
        Kind::Encoder => {
            let plain = json!({
                "encoder_embed_dim": 16, "encoder_attention_heads": 2,
                "encoder_ffn_embed_dim": 32, "encoder_layers": 2, "vocab_size": 20,
                "max_source_positions": 16,
            });
            let mut moe = plain.clone();
            merge(
                &mut moe,
                json!({
                    "moe_freq": 2, "moe_expert_count": 2, "use_xmoe": true,
                    "layer_techniques": [{"layers": [1, 2], "technique": "admin"}],
                    "moe_router": {"kind": "expert_choice", "capacity_factor": 2.0},
                }),
            );
            let mut rel = plain.clone();
            merge(
                &mut rel,
                json!({"rel_pos_buckets": 8, "max_rel_pos": 16, "subln": false,
                       "encoder_normalize_before": true}),
            );
            vec![plain, moe, rel]
        }
        Kind::EncoderDecoder => {
            let plain = json!({
                "encoder_embed_dim": 16, "encoder_attention_heads": 2,
                "encoder_ffn_embed_dim": 32, "encoder_layers": 2,
                "decoder_embed_dim": 16, "decoder_attention_heads": 2,
                "decoder_ffn_embed_dim": 32, "decoder_layers": 2, "vocab_size": 20,
                "max_source_positions": 16, "max_target_positions": 16,
            });
            let mut moe = plain.clone();
            merge(
                &mut moe,
                json!({
                    "moe_freq": 1, "moe_expert_count": 2, "encoder_moe_layers": [0],
                    "decoder_moe_layers": [1], "moe_router": moe_router,
                    "decoder_moe_layer_routers": [expert_choice],
                    "encoder_layer_techniques": [{"layers": [0, 2], "technique": "deepnorm"}],
                    "decoder_layer_techniques": [{"layers": [1, 2], "technique": "pre_ln"}],
                }),
            );
            let mut shared = plain.clone();
            merge(
                &mut shared,
                json!({"share_all_embeddings": true, "admin": true, "subln": false,
                       "encoder_normalize_before": false, "decoder_normalize_before": false,
                       "xpos_rel_pos": true}),
            );
            vec![plain, moe, shared]
        }
    }
}

fn merge(into: &mut Value, from: Value) {
    if let (Value::Object(a), Value::Object(b)) = (into, from) {
        a.extend(b);
    }
}

/// Every key the config struct of `kind` reads with its default (`null` for the extension
/// fields, which stay out of the JSON at their defaults), and a few keys it does not know.
pub fn keys(kind: Kind) -> Vec<(String, Value)> {
    let json = match kind {
        Kind::Decoder => serde_json::to_value(DecoderConfig::default()),
        Kind::Encoder => serde_json::to_value(EncoderConfig::default()),
        Kind::EncoderDecoder => serde_json::to_value(EncoderDecoderConfig::default()),
    }
    .expect("a default config serialises");
    let mut keys: Vec<(String, Value)> = match json {
        Value::Object(m) => m.into_iter().collect(),
        _ => Vec::new(),
    };
    let ext: &[&str] = match kind {
        Kind::EncoderDecoder => &[
            "encoder_layer_techniques",
            "decoder_layer_techniques",
            "encoder_moe_layers",
            "decoder_moe_layers",
            "moe_router",
            "encoder_moe_layer_routers",
            "decoder_moe_layer_routers",
        ],
        _ => &[
            "layer_techniques",
            "moe_layers",
            "moe_router",
            "moe_layer_routers",
        ],
    };
    for k in ext.iter().chain(&["unknown_field", "", "Decoder_Layers"]) {
        if !keys.iter().any(|(x, _)| x == k) {
            keys.push((k.to_string(), Value::Null));
        }
    }
    keys.sort_by(|a, b| a.0.cmp(&b.0));
    keys
}

/// Whether `key` sizes something or routes: edited three times as often as the others.
fn sizes_or_routes(key: &str) -> bool {
    [
        "_dim",
        "layers",
        "heads",
        "positions",
        "vocab",
        "moe_",
        "xpos",
        "rel_pos",
        "router",
    ]
    .iter()
    .any(|p| key.contains(p))
}

/// Integers at the edges: 0, tiny, widths people write by mistake (42030), 2^28, 2^31, 2^32+1,
/// 10^9, 10^12, 2^53, near 2^60, i64::MAX, u64::MAX, negatives.
pub fn int_value() -> BoxedStrategy<Value> {
    let edges: Vec<Value> = vec![
        json!(42030),
        json!(1u64 << 28),
        json!(1u64 << 31),
        json!((1u64 << 32) + 1),
        json!(1_000_000_000u64),
        json!(1_000_000_000_000u64),
        json!(1u64 << 53),
        json!((1u64 << 60) - 3),
        json!(i64::MAX),
        json!(u64::MAX),
        json!(-1),
        json!(-2),
        json!(i64::MIN),
    ];
    prop_oneof![
        3 => (0u64..9).prop_map(Value::from),
        1 => select(vec![16u64, 32, 64, 100, 512, 1000]).prop_map(Value::from),
        2 => select(edges),
    ]
    .boxed()
}

/// Fractions, negatives, the largest and smallest f64 (JSON has no NaN or infinity; the text
/// edits bring those).
pub fn float_value() -> BoxedStrategy<Value> {
    select(vec![
        0.0,
        -0.0,
        0.1,
        0.5,
        1.0,
        1.5,
        2.0,
        -0.5,
        -1.0,
        1e-12,
        1e300,
        -1e300,
        f64::MAX,
        5e-324,
        0.999_999_9,
    ])
    .prop_map(|x| json!(x))
    .boxed()
}

fn string_value() -> BoxedStrategy<Value> {
    select(vec![
        "",
        "relu",
        "gelu",
        "swish",
        "tanh",
        "post_ln",
        "pre_ln",
        "deepnorm",
        "subln",
        "admin",
        "PostLn",
        "capacity",
        "dropless",
        "expert_choice",
        "random",
        "sampling",
        "all",
        "default",
        "1.0",
        "-1",
        "nan",
        "inf",
        "16",
    ])
    .prop_map(Value::from)
    .boxed()
}

fn technique_value() -> BoxedStrategy<Value> {
    prop_oneof![
        4 => select(vec!["post_ln", "pre_ln", "deepnorm", "subln", "admin", "DeepNorm"])
            .prop_map(Value::from),
        1 => string_value(),
        1 => int_value(),
    ]
    .boxed()
}

/// A value of any JSON type, nested at most once.
pub fn any_value() -> BoxedStrategy<Value> {
    let leaf = prop_oneof![
        4 => int_value(),
        2 => float_value(),
        1 => any::<bool>().prop_map(Value::from),
        1 => Just(Value::Null),
        2 => string_value(),
    ];
    leaf.prop_recursive(1, 6, 3, |inner| {
        prop_oneof![
            proptest::collection::vec(inner.clone(), 0..3).prop_map(Value::Array),
            proptest::collection::vec((select(vec!["layers", "kind", "k", "x"]), inner), 0..3)
                .prop_map(|kv| Value::Object(
                    kv.into_iter().map(|(k, v)| (k.to_string(), v)).collect()
                )),
        ]
    })
    .boxed()
}

/// A router: valid kinds with edge values, a missing or unknown field, the wrong type.
pub fn router_value() -> BoxedStrategy<Value> {
    prop_oneof![
        1 => Just(json!({"kind": "capacity"})),
        3 => int_value().prop_map(|k| json!({"kind": "dropless", "k": k})),
        3 => prop_oneof![float_value(), int_value()]
            .prop_map(|f| json!({"kind": "expert_choice", "capacity_factor": f})),
        1 => select(vec![
            json!({"kind": "dropless"}),
            json!({"kind": "expert_choice"}),
            json!({"kind": "top_3"}),
            json!({"k": 2}),
            json!("dropless"),
            json!({"kind": "dropless", "k": 1, "extra": true}),
        ]),
        1 => any_value(),
    ]
    .boxed()
}

fn layer_technique_entry() -> BoxedStrategy<Value> {
    prop_oneof![
        6 => (int_value(), int_value(), technique_value())
            .prop_map(|(a, b, t)| json!({"layers": [a, b], "technique": t})),
        1 => (int_value(), technique_value())
            .prop_map(|(a, t)| json!({"layers": [a], "technique": t})),
        1 => technique_value().prop_map(|t| json!({"technique": t})),
        1 => any_value(),
    ]
    .boxed()
}

fn layer_router_entry() -> BoxedStrategy<Value> {
    prop_oneof![
        6 => (int_value(), router_value()).prop_map(|(l, r)| json!({"layer": l, "router": r})),
        1 => int_value().prop_map(|l| json!({"layer": l})),
        1 => any_value(),
    ]
    .boxed()
}

/// A value for `key` whose default is `default`: most of the time of the field's type (for the
/// extension fields, entries of their shape with edge values), else anything.
pub fn value_for(key: &str, default: &Value) -> BoxedStrategy<Value> {
    use proptest::collection::vec;
    if key.ends_with("layer_techniques") {
        prop_oneof![4 => vec(layer_technique_entry(), 0..3).prop_map(Value::Array), 1 => any_value()].boxed()
    } else if key.ends_with("moe_layers") {
        prop_oneof![
            4 => vec(int_value(), 0..4).prop_map(Value::Array),
            1 => Just(Value::Null),
            1 => any_value(),
        ]
        .boxed()
    } else if key == "moe_router" {
        router_value()
    } else if key.ends_with("moe_layer_routers") {
        prop_oneof![4 => vec(layer_router_entry(), 0..3).prop_map(Value::Array), 1 => any_value()]
            .boxed()
    } else {
        match default {
            Value::Bool(_) => {
                prop_oneof![6 => any::<bool>().prop_map(Value::from), 1 => any_value()].boxed()
            }
            Value::String(_) => prop_oneof![3 => string_value(), 1 => any_value()].boxed(),
            Value::Number(n) if n.is_f64() => prop_oneof![
                4 => float_value(),
                1 => int_value(),
                1 => any_value(),
            ]
            .boxed(),
            Value::Number(_) => prop_oneof![
                6 => int_value(),
                1 => float_value(),
                1 => any_value(),
            ]
            .boxed(),
            _ => any_value(),
        }
    }
}

/// One edit of a config object.
#[derive(Debug, Clone)]
pub enum Edit {
    /// `key` set to the value.
    Set(String, Value),
    /// `key` removed.
    Remove(String),
    /// The value of `key` moved to `to`.
    Rename(String, String),
}

impl Edit {
    /// Applies the edit to `obj`, in words.
    pub fn apply(&self, obj: &mut Map<String, Value>) -> String {
        match self {
            Edit::Set(k, v) => {
                obj.insert(k.clone(), v.clone());
                format!("{k} = {v}")
            }
            Edit::Remove(k) => {
                obj.remove(k);
                format!("remove {k}")
            }
            Edit::Rename(k, to) => {
                if let Some(v) = obj.remove(k) {
                    obj.insert(to.clone(), v);
                }
                format!("rename {k} to {to}")
            }
        }
    }
}

/// An edit of a `kind` config.
pub fn edit(kind: Kind) -> BoxedStrategy<Edit> {
    let keys = keys(kind);
    let weighted: Vec<(String, Value)> = keys
        .iter()
        .flat_map(|(k, d)| {
            let n = if sizes_or_routes(k) { 3 } else { 1 };
            std::iter::repeat_n((k.clone(), d.clone()), n)
        })
        .collect();
    let names: Vec<String> = keys.into_iter().map(|(k, _)| k).collect();
    prop_oneof![
        8 => select(weighted).prop_flat_map(|(k, d)| {
            value_for(&k, &d).prop_map(move |v| Edit::Set(k.clone(), v))
        }),
        1 => select(names.clone()).prop_map(Edit::Remove),
        1 => (select(names.clone()), select(names)).prop_map(|(a, b)| Edit::Rename(a, b)),
    ]
    .boxed()
}

/// An edit of the JSON text.
#[derive(Debug, Clone)]
pub enum TextEdit {
    /// The n-th number replaced by a token JSON has no value for, or that no field type reads.
    Number(Index, &'static str),
    /// Cut at a fraction of the text.
    Truncate(Index),
    /// A key repeated in front (serde_json keeps the last value of a repeated key).
    Duplicate(&'static str, &'static str),
}

/// Tokens that are not plain JSON numbers (or not in range of any field).
pub const ODD_NUMBERS: &[&str] = &[
    "NaN",
    "Infinity",
    "-Infinity",
    "1e999",
    "-1e999",
    "18446744073709551616",
    "-9223372036854775809",
    "1.0e",
    "0x10",
    "\"7\"",
    "null",
    "[]",
    "{}",
    "1.5",
    "-0",
    "1e3",
];

fn text_edit() -> BoxedStrategy<TextEdit> {
    prop_oneof![
        6 => (any::<Index>(), select(ODD_NUMBERS.to_vec())).prop_map(|(i, t)| TextEdit::Number(i, t)),
        1 => any::<Index>().prop_map(TextEdit::Truncate),
        2 => (
            select(vec!["decoder_layers", "encoder_layers", "vocab_size", "decoder_embed_dim"]),
            select(vec!["1000000000", "0", "-1", "NaN", "\"x\""]),
        )
            .prop_map(|(k, v)| TextEdit::Duplicate(k, v)),
    ]
    .boxed()
}

impl TextEdit {
    /// Applies the edit to `text`, in words.
    pub fn apply(&self, text: &mut String) -> String {
        match self {
            TextEdit::Number(i, token) => {
                let spans = number_spans(text);
                if spans.is_empty() {
                    return "no number to replace".into();
                }
                let (a, b) = spans[i.index(spans.len())];
                let old = text[a..b].to_string();
                text.replace_range(a..b, token);
                format!("text: number {old} -> {token}")
            }
            TextEdit::Truncate(i) => {
                let mut n = i.index(text.len().max(1));
                while !text.is_char_boundary(n) {
                    n -= 1;
                }
                text.truncate(n);
                format!("text: truncated to {n} bytes")
            }
            TextEdit::Duplicate(k, v) => {
                if text.starts_with('{') {
                    text.insert_str(1, &format!("\"{k}\": {v}, "));
                }
                format!("text: \"{k}\": {v} repeated in front")
            }
        }
    }
}

/// Byte ranges of the JSON numbers in `text` (outside strings).
fn number_spans(text: &str) -> Vec<(usize, usize)> {
    let b = text.as_bytes();
    let (mut out, mut i, mut in_str) = (Vec::new(), 0, false);
    while i < b.len() {
        let c = b[i];
        if in_str {
            if c == b'\\' {
                i += 1;
            } else if c == b'"' {
                in_str = false;
            }
            i += 1;
            continue;
        }
        if c == b'"' {
            in_str = true;
            i += 1;
            continue;
        }
        if c == b'-' || c.is_ascii_digit() {
            let start = i;
            while i < b.len() && matches!(b[i], b'0'..=b'9' | b'-' | b'+' | b'.' | b'e' | b'E') {
                i += 1;
            }
            out.push((start, i));
            continue;
        }
        i += 1;
    }
    out
}

/// A config case: a base of a random kind, 0 to 4 edits, sometimes a text edit.
pub fn case() -> BoxedStrategy<ConfigCase> {
    select(vec![Kind::Decoder, Kind::Encoder, Kind::EncoderDecoder])
        .prop_flat_map(|kind| {
            (
                Just(kind),
                select(bases(kind)),
                proptest::collection::vec(edit(kind), 0..4),
                proptest::option::weighted(0.2, text_edit()),
                any::<bool>(),
            )
        })
        .prop_map(|(kind, base, edits, text_edit, train)| {
            let mut obj = match base {
                Value::Object(m) => m,
                _ => Map::new(),
            };
            let mut words: Vec<String> = edits.iter().map(|e| e.apply(&mut obj)).collect();
            let mut text = Value::Object(obj).to_string();
            if let Some(t) = text_edit {
                words.push(t.apply(&mut text));
            }
            ConfigCase {
                kind,
                text,
                train,
                edits: words,
            }
        })
        .boxed()
}

/// `[1, 4]` token ids inside a vocabulary of `vocab` (any ids when it has none).
fn tokens(vocab: i64) -> Result<Tensor> {
    let v = vocab.max(1).min(u32::MAX as i64) as u32;
    let ids: Vec<u32> = (2..6u32).map(|i| i % v).collect();
    Ok(Tensor::from_vec(ids, (1, 4), &Device::Cpu)?)
}

/// In training mode, the gradients of the sum of `x`.
fn backward(x: &Tensor, train: bool) -> Result<()> {
    if train {
        x.sum_all()?.backward()?;
    }
    Ok(())
}

/// Parses, finalizes, builds (within the budget) and runs the case's config: a forward pass
/// (with its backward in training mode).
pub fn run(case: &ConfigCase) -> Verdict {
    let store = ParamStore::new(7);
    let vb = || store.var_builder(DType::F32, &Device::Cpu);
    let opts = build_options();
    match case.kind {
        Kind::Decoder => {
            let cfg = DecoderConfig::from_json_str(&case.text)?;
            cfg.to_json_string()?;
            let fin = cfg.clone().finalize()?;
            let m = Decoder::new(&cfg, &opts, vb())?;
            let toks = tokens(fin.vocab_size)?;
            let inp = DecoderInputs {
                train: case.train,
                ..Default::default()
            };
            backward(&m.forward(&toks, &inp)?.x, case.train)?;
            let mut state = IncrementalState::new(true);
            m.forward_incremental(
                &toks.narrow(1, 0, 2)?,
                &DecoderInputs::default(),
                &mut state,
            )?;
            m.forward_incremental(
                &toks.narrow(1, 0, 3)?,
                &DecoderInputs::default(),
                &mut state,
            )?;
        }
        Kind::Encoder => {
            let cfg = EncoderConfig::from_json_str(&case.text)?;
            cfg.to_json_string()?;
            let fin = cfg.clone().finalize()?;
            let m = Encoder::new(&cfg, &opts, vb())?;
            let inp = EncoderInputs {
                train: case.train,
                ..Default::default()
            };
            backward(
                &m.forward(&tokens(fin.vocab_size)?, &inp)?.encoder_out,
                case.train,
            )?;
        }
        Kind::EncoderDecoder => {
            let cfg = EncoderDecoderConfig::from_json_str(&case.text)?;
            cfg.to_json_string()?;
            let fin = cfg.clone().finalize()?;
            let m = EncoderDecoder::new(&cfg, &opts, vb())?;
            let toks = tokens(fin.vocab_size)?;
            let (_, out) = m.forward(&toks, None, &toks.narrow(1, 0, 3)?, case.train)?;
            backward(&out.x, case.train)?;
        }
    }
    Ok(())
}
