//! The shape a stack description gives each state_dict key, so that a checkpoint's header can be
//! compared with its `config.json` before a model is built from the config.
//!
//! A folder whose config claims 10^12 positions while its weights hold 32 must fail on the
//! shapes, not by building a table of 10^12 rows first.

use std::collections::BTreeMap;

use torchscale_core::{Error, Result};

use super::StackHooks;
use crate::spec::StackSpec;

/// The shape torchscale's layout gives `key` (a key of the stack, without the `encoder.` /
/// `decoder.` of an encoder-decoder) in a stack described by `spec`; None for a key whose shape
/// the description does not fix (Admin's ω, a custom site's, an unknown key) or that the stack
/// does not build. Multiway copies (`.A.`, `.B.`) have the shape of the module they copy.
pub fn expected_shape(spec: &StackSpec, key: &str) -> Option<Vec<usize>> {
    let parts: Vec<&str> = key
        .split('.')
        .filter(|p| !matches!(*p, "A" | "B"))
        .collect();
    let c = spec.embed_dim;
    let vocab = usize::try_from(spec.vocab_size).ok().filter(|&v| v > 0);
    match parts.as_slice() {
        ["embed_tokens" | "output_projection", "weight"] => Some(vec![vocab?, c]),
        ["embed_positions", "weight"] if spec.learned_positions => {
            Some(vec![spec.max_positions.checked_add(2)?, c])
        }
        ["layer_norm" | "layernorm_embedding", "weight" | "bias"] => Some(vec![c]),
        [_, "relative_attention_bias", "weight"] if spec.rel_pos() => {
            Some(vec![spec.rel_pos_buckets, spec.heads])
        }
        ["layers", _, rest @ ..] => layer_shape(spec, rest),
        _ => None,
    }
}

/// A key inside `layers.{i}`.
fn layer_shape(spec: &StackSpec, parts: &[&str]) -> Option<Vec<usize>> {
    let c = spec.embed_dim;
    let wb = |w: Vec<usize>, b: Vec<usize>, which: &str| match which {
        "weight" => Some(w),
        "bias" => Some(b),
        _ => None,
    };
    match parts {
        ["self_attn" | "encoder_attn", "q_proj" | "k_proj" | "v_proj" | "out_proj", p] => {
            wb(vec![c, c], vec![c], p)
        }
        ["self_attn", "inner_attn_ln", p] => wb(vec![c], vec![c], p),
        ["self_attn", "xpos", "scale"] => Some(vec![c / spec.heads.max(1) / 2]),
        ["self_attn_layer_norm" | "encoder_attn_layer_norm" | "final_layer_norm", p] => {
            wb(vec![c], vec![c], p)
        }
        ["ffn", rest @ ..] => ffn_shape(c, spec.ffn_dim, rest),
        ["moe_layer", rest @ ..] => {
            let m = &spec.moe.as_ref()?.layer;
            match rest {
                ["experts", _, rest @ ..] => ffn_shape(m.embed_dim, m.ffn_dim, rest),
                ["gate", "wg", "weight"] => Some(vec![m.num_experts, m.embed_dim]),
                ["gate", "wg_reduction", "weight"] => Some(vec![m.xmoe_routing_dim, m.embed_dim]),
                ["gate", "wg"] => Some(vec![m.num_experts, m.xmoe_routing_dim]),
                ["gate", "gating_t"] => Some(vec![1]),
                _ => None,
            }
        }
        _ => None,
    }
}

/// A key inside a feed-forward block (`ffn` or an expert) of width `c` and inner width `f`.
fn ffn_shape(c: usize, f: usize, parts: &[&str]) -> Option<Vec<usize>> {
    match parts {
        ["fc1", "weight"] => Some(vec![f, c]),
        ["fc1", "bias"] | ["ffn_layernorm", "weight" | "bias"] => Some(vec![f]),
        ["fc2", "weight"] => Some(vec![c, f]),
        ["fc2", "bias"] => Some(vec![c]),
        _ => None,
    }
}

/// Compares the shapes of a checkpoint (`shapes`: key → shape, from the file's header, keys of
/// this stack only) with the stack `spec` describes, before anything is built:
///
/// - a key whose shape the description fixes must have it ([`Error::TensorShape`] naming the
///   key, the shape the config asks for and the file's);
/// - the file's layers must be the stack's: a missing top layer is [`Error::MissingTensor`], a
///   layer beyond the stack [`Error::UnexpectedTensor`], each naming a key.
///
/// Keys the user's `hooks` may build differently (every site of a layer with a site hook, the
/// gate with a router hook) are left to the strict load that follows the build.
pub fn check_shapes<'a>(
    spec: &StackSpec,
    hooks: &StackHooks,
    shapes: impl IntoIterator<Item = (&'a str, &'a [usize])>,
) -> Result<()> {
    // Sorted, so the error names the same key every time.
    let shapes: BTreeMap<&str, &[usize]> = shapes.into_iter().collect();
    let mut top: Option<(usize, &str)> = None;
    for (&key, &got) in &shapes {
        let layer = layer_index(key);
        if let Some(i) = layer {
            if top.is_none_or(|(t, _)| i > t) {
                top = Some((i, key));
            }
        }
        let skip = layer.is_some()
            && (hooks.sites.is_some() || (hooks.router.is_some() && key.contains(".gate.")));
        if skip {
            continue;
        }
        if let Some(expected) = expected_shape(spec, key) {
            if expected != got {
                return Err(Error::TensorShape {
                    key: key.to_string(),
                    expected,
                    got: got.to_vec(),
                });
            }
        }
    }
    let Some((top, top_key)) = top else {
        return Ok(());
    };
    if top >= spec.layers {
        return Err(Error::UnexpectedTensor {
            key: top_key.to_string(),
        });
    }
    if top + 1 < spec.layers {
        // The same key one layer up is what the stack's next layer would read first.
        let missing = format!("layers.{}.{}", top + 1, after_layer(top_key));
        return Err(Error::MissingTensor { key: missing });
    }
    Ok(())
}

/// `i` of a `layers.{i}.…` key.
fn layer_index(key: &str) -> Option<usize> {
    key.strip_prefix("layers.")?.split('.').next()?.parse().ok()
}

/// The part of a `layers.{i}.…` key after the index.
fn after_layer(key: &str) -> &str {
    key.splitn(3, '.').nth(2).unwrap_or("")
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::build::{decoder_spec, BuildOptions};
    use crate::config::DecoderConfig;

    fn spec(cfg: DecoderConfig) -> StackSpec {
        decoder_spec(&cfg.finalize().unwrap(), &BuildOptions::default())
    }

    fn small() -> DecoderConfig {
        DecoderConfig::default()
            .with_vocab_size(50)
            .with_embed_dim(8)
            .with_heads(2)
            .with_ffn_dim(12)
            .with_layers(2)
            .with_max_positions(32)
    }

    #[test]
    fn shapes_of_torchscale_keys() {
        let s = spec(small());
        let e = |k: &str| expected_shape(&s, k);
        assert_eq!(e("embed_tokens.weight"), Some(vec![50, 8]));
        assert_eq!(e("embed_positions.weight"), Some(vec![34, 8]));
        assert_eq!(e("layers.1.self_attn.q_proj.weight"), Some(vec![8, 8]));
        assert_eq!(e("layers.1.self_attn.out_proj.A.bias"), Some(vec![8]));
        assert_eq!(e("layers.0.ffn.fc1.weight"), Some(vec![12, 8]));
        assert_eq!(e("layers.0.ffn.fc2.weight"), Some(vec![8, 12]));
        assert_eq!(e("layers.0.ffn.ffn_layernorm.bias"), Some(vec![12]));
        assert_eq!(e("layers.0.final_layer_norm.weight"), Some(vec![8]));
        assert_eq!(e("layers.0.ffn_residual.omega"), None);
        assert_eq!(e("something.else"), None);
    }

    #[test]
    fn header_checks_name_the_key_and_both_shapes() {
        let s = spec(small());
        let hooks = StackHooks::default();
        let ok: Vec<(&str, Vec<usize>)> = vec![
            ("embed_positions.weight", vec![34, 8]),
            ("layers.0.self_attn.q_proj.weight", vec![8, 8]),
            ("layers.1.self_attn.q_proj.weight", vec![8, 8]),
        ];
        let run = |v: &[(&'static str, Vec<usize>)]| {
            check_shapes(&s, &hooks, v.iter().map(|(k, d)| (*k, d.as_slice())))
        };
        assert!(run(&ok).is_ok());
        let mut bad = ok.clone();
        bad[0].1 = vec![3, 8];
        match run(&bad) {
            Err(Error::TensorShape { key, expected, got }) => {
                assert_eq!(key, "embed_positions.weight");
                assert_eq!((expected, got), (vec![34, 8], vec![3, 8]));
            }
            other => panic!("{other:?}"),
        }
        match run(&ok[..2]) {
            Err(Error::MissingTensor { key }) => {
                assert_eq!(key, "layers.1.self_attn.q_proj.weight")
            }
            other => panic!("{other:?}"),
        }
        let mut extra = ok.clone();
        extra.push(("layers.2.self_attn.q_proj.weight", vec![8, 8]));
        assert!(matches!(run(&extra), Err(Error::UnexpectedTensor { .. })));
    }
}
