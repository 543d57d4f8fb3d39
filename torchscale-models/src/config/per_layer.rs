//! Per-layer choices of a config (our extension): a technique for a range of layers, explicit
//! MoE layer positions, a router per MoE layer, and their checks.

use std::ops::Range;

use serde::{Deserialize, Serialize};
use torchscale_core::{Error, Result};
use torchscale_moe::RouterChoice;

use super::Technique;

/// A technique for the layers `layers[0]..layers[1]` (half-open) of a stack, in place of the
/// config's own (JSON: `{"layers": [0, 2], "technique": "post_ln"}`).
///
/// The stabiliser is built for the whole stack, so a DeepNorm or Admin range inside a mixed
/// stack uses the α, β or ω of the full depth.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LayerTechnique {
    /// `[start, end)` layer indices.
    pub layers: [usize; 2],
    /// The technique of those layers.
    pub technique: Technique,
}

impl LayerTechnique {
    /// `technique` for the layers in `range`.
    pub fn new(range: Range<usize>, technique: Technique) -> Self {
        Self {
            layers: [range.start, range.end],
            technique,
        }
    }

    /// Whether layer `i` is in the range.
    pub fn contains(&self, i: usize) -> bool {
        (self.layers[0]..self.layers[1]).contains(&i)
    }

    /// The technique `list` gives layer `i`, if any entry covers it.
    pub fn technique_of(list: &[LayerTechnique], i: usize) -> Option<Technique> {
        list.iter().find(|e| e.contains(i)).map(|e| e.technique)
    }
}

/// The router of one MoE layer, in place of the config's `moe_router`
/// (JSON: `{"layer": 3, "router": {"kind": "dropless", "k": 2}}`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct LayerRouter {
    /// The MoE layer (0-based index in its stack).
    pub layer: usize,
    /// Its router.
    pub router: RouterChoice,
}

impl LayerRouter {
    /// `router` for MoE layer `layer`.
    pub fn new(layer: usize, router: RouterChoice) -> Self {
        Self { layer, router }
    }

    /// The router `list` gives layer `i`, else `default`.
    pub fn router_of<'a>(
        list: &'a [LayerRouter],
        default: &'a RouterChoice,
        i: usize,
    ) -> &'a RouterChoice {
        list.iter()
            .find(|e| e.layer == i)
            .map_or(default, |e| &e.router)
    }
}

/// The MoE routers of a stack: `default` (the config's `moe_router`, named `default_field`) and
/// the overrides in `list` (named `field`), which must name distinct MoE layers
/// (`is_moe(i)`); each router is checked for `experts` experts. Only runs when the stack has
/// MoE layers, or when `list` is not empty.
pub(crate) fn routers(
    default_field: &str,
    default: &RouterChoice,
    field: &str,
    list: &[LayerRouter],
    experts: usize,
    has_moe: bool,
    is_moe: impl Fn(usize) -> bool,
) -> Result<()> {
    if has_moe {
        default.validate(experts, default_field)?;
    }
    for (j, e) in list.iter().enumerate() {
        let i = e.layer;
        if !is_moe(i) {
            return Err(Error::config(
                field,
                format!("entry {j}: layer {i} is not an MoE layer (see moe_freq / moe_layers)"),
            ));
        }
        if list[..j].iter().any(|o| o.layer == i) {
            return Err(Error::config(
                field,
                format!("entry {j} gives layer {i} a second router"),
            ));
        }
        e.router
            .validate(experts, &format!("{field}[{j}].router"))?;
    }
    Ok(())
}

/// The technique of layer `i`: the entry covering it, else `default`.
pub(crate) fn technique_at(list: &[LayerTechnique], default: Technique, i: usize) -> Technique {
    LayerTechnique::technique_of(list, i).unwrap_or(default)
}

/// Ranges inside `0..layers`, non-empty, not overlapping.
pub(crate) fn layer_techniques(field: &str, list: &[LayerTechnique], layers: usize) -> Result<()> {
    for (j, e) in list.iter().enumerate() {
        let [start, end] = e.layers;
        let bad = |why: String| Error::config(field, format!("entry {j} ({start}..{end}): {why}"));
        if start >= end {
            return Err(bad("the range is empty".into()));
        }
        if end > layers {
            return Err(bad(format!("the stack has {layers} layers")));
        }
        if let Some((k, o)) = list[..j]
            .iter()
            .enumerate()
            .find(|(_, o)| start < o.layers[1] && o.layers[0] < end)
        {
            return Err(bad(format!(
                "overlaps entry {k} ({}..{})",
                o.layers[0], o.layers[1]
            )));
        }
    }
    Ok(())
}

/// Explicit MoE positions: inside `0..layers` and distinct.
pub(crate) fn moe_layers(field: &str, list: Option<&[usize]>, layers: usize) -> Result<()> {
    let Some(list) = list else { return Ok(()) };
    for (j, &i) in list.iter().enumerate() {
        if i >= layers {
            return Err(Error::config(
                field,
                format!("entry {j} (layer {i}) is outside the stack's {layers} layers"),
            ));
        }
        if list[..j].contains(&i) {
            return Err(Error::config(
                field,
                format!("entry {j} lists layer {i} again"),
            ));
        }
    }
    Ok(())
}

/// Whether layer `i` is an MoE layer: in `moe_layers` when given, else every `freq`-th layer.
pub(crate) fn is_moe_layer(moe_layers: Option<&[usize]>, freq: usize, i: usize) -> bool {
    match moe_layers {
        Some(list) => list.contains(&i),
        None => freq != 0 && (i + 1).is_multiple_of(freq),
    }
}

/// Whether a stack has MoE layers at all (before checking the expert count).
pub(crate) fn has_moe_layers(moe_layers: Option<&[usize]>, freq: usize) -> bool {
    match moe_layers {
        Some(list) => !list.is_empty(),
        None => freq > 0,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn field(r: Result<()>) -> String {
        match r {
            Err(Error::Config { field, reason }) => {
                assert!(reason.contains("entry"), "{reason}");
                field
            }
            other => panic!("expected a Config error, got {other:?}"),
        }
    }

    #[test]
    fn ranges() {
        let t = |a, b| LayerTechnique::new(a..b, Technique::PostLn);
        assert!(layer_techniques("layer_techniques", &[t(0, 2), t(2, 4)], 4).is_ok());
        assert!(layer_techniques("layer_techniques", &[], 4).is_ok());
        for bad in [vec![t(2, 2)], vec![t(3, 5)], vec![t(0, 3), t(2, 4)]] {
            assert_eq!(
                field(layer_techniques("x_techniques", &bad, 4)),
                "x_techniques"
            );
        }
        let list = [t(1, 3)];
        assert_eq!(LayerTechnique::technique_of(&list, 0), None);
        assert_eq!(technique_at(&list, Technique::PreLn, 2), Technique::PostLn);
        assert_eq!(technique_at(&list, Technique::PreLn, 3), Technique::PreLn);
    }

    #[test]
    fn router_overrides() {
        let cap = RouterChoice::Capacity;
        let dropless = |k| LayerRouter::new(1, RouterChoice::Dropless { k });
        let is_moe = |i: usize| i == 1 || i == 3;
        let check = |list: &[LayerRouter]| {
            routers(
                "moe_router",
                &cap,
                "moe_layer_routers",
                list,
                4,
                true,
                is_moe,
            )
        };
        assert!(check(&[dropless(2)]).is_ok());
        assert_eq!(
            field(check(&[LayerRouter::new(2, cap.clone())])),
            "moe_layer_routers"
        );
        assert_eq!(
            field(check(&[dropless(2), dropless(1)])),
            "moe_layer_routers"
        );
        match check(&[dropless(9)]) {
            Err(Error::Config { field, .. }) => {
                assert!(field.starts_with("moe_layer_routers[0]"), "{field}")
            }
            other => panic!("{other:?}"),
        }
        assert_eq!(
            LayerRouter::router_of(&[dropless(2)], &cap, 1),
            &RouterChoice::Dropless { k: 2 }
        );
        assert_eq!(LayerRouter::router_of(&[dropless(2)], &cap, 3), &cap);
    }

    #[test]
    fn moe_positions() {
        assert!(moe_layers("moe_layers", Some(&[1, 3]), 4).is_ok());
        assert!(moe_layers("moe_layers", None, 4).is_ok());
        assert_eq!(field(moe_layers("moe_layers", Some(&[4]), 4)), "moe_layers");
        assert_eq!(
            field(moe_layers("moe_layers", Some(&[1, 1]), 4)),
            "moe_layers"
        );
        assert!(is_moe_layer(Some(&[1, 3]), 0, 3) && !is_moe_layer(Some(&[1, 3]), 1, 0));
        assert!(is_moe_layer(None, 2, 1) && !is_moe_layer(None, 0, 1));
        assert!(!has_moe_layers(Some(&[]), 2) && has_moe_layers(None, 2));
    }
}
