//! torchscale 0.3.0's configuration objects as serde structs.
//!
//! [`EncoderConfig`], [`DecoderConfig`] and [`EncoderDecoderConfig`] carry torchscale's field
//! names, types and defaults, so a torchscale config JSON (for example the `config` metadata of
//! a golden file) loads unchanged and serialises back to the same JSON. Our extensions (`admin*`,
//! `xmoe_paper_routing`) are omitted from the JSON while at their defaults.
//!
//! `finalize()` applies torchscale 0.3.0's post-construction rules (`deepnorm` → Post-LN,
//! `subln` → Pre-LN, `use_xmoe` → gate options; not git HEAD's regressed version) and then
//! validates, returning [`Error::Config`](torchscale_core::Error::Config) with the torchscale
//! field name. [`Technique`] is the residual scheme the finalised flags select.
//!
//! ```
//! use torchscale_models::config::{EncoderConfig, Technique};
//!
//! # fn main() -> torchscale_core::Result<()> {
//! let cfg = EncoderConfig::new()
//!     .with_embed_dim(64)
//!     .with_heads(4)
//!     .with_ffn_dim(128)
//!     .with_layers(6)
//!     .with_deepnorm(true)
//!     .finalize()?;
//! // DeepNorm forces Post-LN and switches the default Sub-LN off.
//! assert!(!cfg.encoder_normalize_before && !cfg.subln);
//! assert_eq!(cfg.technique(), Technique::DeepNorm);
//!
//! let again = EncoderConfig::from_json_str(&cfg.to_json_string()?)?;
//! assert_eq!(again, cfg);
//! # Ok(()) }
//! ```

mod builders;
mod decoder;
mod encoder;
mod encoder_decoder;
mod json;
pub(crate) mod per_layer;
mod technique;
pub mod validate;

pub use decoder::DecoderConfig;
pub use encoder::EncoderConfig;
pub use encoder_decoder::EncoderDecoderConfig;
pub use per_layer::{LayerRouter, LayerTechnique};
pub use technique::Technique;

/// serde `skip_serializing_if` helper for extension flags.
fn is_false(b: &bool) -> bool {
    !*b
}

/// serde `skip_serializing_if` helper for `admin_output_change_scale`.
fn is_default_scale(s: &str) -> bool {
    s == "default"
}

#[cfg(test)]
mod golden_tests {
    //! Every golden file's `config` metadata must load into the class named by `config_class`,
    //! and serialise back to exactly torchscale's JSON.

    use super::*;
    use serde::de::DeserializeOwned;
    use serde::Serialize;
    use serde_json::Value;
    use std::collections::{BTreeMap, HashMap};
    use std::fmt::Debug;
    use std::path::PathBuf;

    /// `{golden file: {metadata key: text}}` from `testdata/golden_configs.json`, the index of
    /// the repository's `testdata/golden` (kept current by `cargo test -p xtask --test
    /// testdata`), which travels in the package without the tensors.
    fn golden_index() -> BTreeMap<String, HashMap<String, String>> {
        let path = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("testdata/golden_configs.json");
        let text =
            std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()));
        serde_json::from_str(&text).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
    }

    /// Loads `json` as `T`, re-serialises, and checks the JSON is identical to torchscale's and
    /// that re-parsing gives an equal struct.
    fn round_trip<T>(json: &str, load: fn(&str) -> torchscale_core::Result<T>) -> T
    where
        T: Serialize + DeserializeOwned + PartialEq + Debug,
    {
        let cfg = load(json).unwrap_or_else(|e| panic!("{e}: {json}"));
        let ours = serde_json::to_value(&cfg).unwrap();
        let theirs: Value = serde_json::from_str(json).unwrap();
        if let (Value::Object(o), Value::Object(t)) = (&ours, &theirs) {
            for (k, v) in t {
                assert_eq!(o.get(k), Some(v), "key {k}");
            }
        }
        assert_eq!(ours, theirs);
        let again = load(&serde_json::to_string(&cfg).unwrap()).unwrap();
        assert_eq!(again, cfg);
        cfg
    }

    /// The technique named in the case kind, if any (`encoder_postln` → PostLn, ...).
    fn technique_in_kind(kind: &str) -> Option<Technique> {
        [
            ("postln", Technique::PostLn),
            ("preln", Technique::PreLn),
            ("deepnorm", Technique::DeepNorm),
            ("subln", Technique::SubLn),
        ]
        .into_iter()
        .find(|(name, _)| kind.contains(name))
        .map(|(_, t)| t)
    }

    #[test]
    fn golden_configs_load_and_round_trip() {
        let mut seen: HashMap<&'static str, usize> = HashMap::new();
        for (path, meta) in golden_index() {
            let (Some(class), Some(json)) = (meta.get("config_class"), meta.get("config")) else {
                continue;
            };
            let kind = meta.get("kind").cloned().unwrap_or_default();
            let class = class.split_whitespace().next().unwrap_or("");
            let technique = match class {
                "EncoderConfig" => {
                    *seen.entry("encoder").or_default() += 1;
                    Some(round_trip(json, EncoderConfig::from_json_str).technique())
                }
                "DecoderConfig" => {
                    *seen.entry("decoder").or_default() += 1;
                    Some(round_trip(json, DecoderConfig::from_json_str).technique())
                }
                "EncoderDecoderConfig" => {
                    *seen.entry("encoder_decoder").or_default() += 1;
                    let c = round_trip(json, EncoderDecoderConfig::from_json_str);
                    // Both stacks share the flags in these files.
                    assert_eq!(c.encoder_technique(), c.decoder_technique());
                    Some(c.decoder_technique())
                }
                _ => None,
            };
            if let (Some(got), Some(want)) = (technique, technique_in_kind(&kind)) {
                assert_eq!(got, want, "{path}");
            }
        }
        for class in ["encoder", "decoder", "encoder_decoder"] {
            assert!(
                seen.get(class).copied().unwrap_or(0) > 0,
                "no golden {class} config"
            );
        }
    }
}
