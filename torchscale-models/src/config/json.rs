//! JSON loading and saving shared by the config structs, with errors that name the field.

use std::path::Path;

use serde::de::DeserializeOwned;
use serde::Serialize;
use serde_json::{Map, Value};
use torchscale_core::{Error, Result};

/// Parses `s` into `T`. A syntax error is [`Error::Invalid`] (`config JSON`); a value of the wrong
/// type (including an unknown `activation_fn`) is [`Error::Config`] naming its key.
pub(crate) fn parse<T: DeserializeOwned>(s: &str) -> Result<T> {
    let value: Value =
        serde_json::from_str(s).map_err(|e| Error::invalid("config JSON", e.to_string()))?;
    from_value(value)
}

/// Reads and parses a file. I/O and syntax errors are [`Error::File`] naming the path.
pub(crate) fn read<T: DeserializeOwned>(path: &Path) -> Result<T> {
    let shown = path.display().to_string();
    let text = std::fs::read_to_string(path).map_err(|e| Error::File {
        path: shown.clone(),
        reason: e.to_string(),
    })?;
    let value: Value = serde_json::from_str(&text).map_err(|e| Error::File {
        path: shown.clone(),
        reason: format!("invalid JSON: {e}"),
    })?;
    from_value(value).map_err(|e| match e {
        Error::Config { field, reason } => Error::Config {
            field,
            reason: format!("{reason} (in {shown})"),
        },
        other => Error::File {
            path: shown.clone(),
            reason: other.to_string(),
        },
    })
}

/// Serialises to compact JSON.
pub(crate) fn to_string<T: Serialize>(c: &T) -> Result<String> {
    serde_json::to_string(c).map_err(|e| Error::invalid("config", e.to_string()))
}

fn from_value<T: DeserializeOwned>(value: Value) -> Result<T> {
    let Value::Object(map) = value else {
        return Err(Error::invalid("config JSON", "expected a JSON object"));
    };
    match serde_json::from_value::<T>(Value::Object(map.clone())) {
        Ok(t) => Ok(t),
        Err(e) => {
            Err(culprit::<T>(&map).unwrap_or_else(|| Error::invalid("config JSON", e.to_string())))
        }
    }
}

/// serde_json does not say which key failed; every field has a default, so a one-key object
/// isolates the first key whose value cannot be read.
fn culprit<T: DeserializeOwned>(map: &Map<String, Value>) -> Option<Error> {
    map.iter().find_map(|(k, v)| {
        let mut one = Map::new();
        one.insert(k.clone(), v.clone());
        serde_json::from_value::<T>(Value::Object(one))
            .err()
            .map(|e| Error::config(k.clone(), e.to_string()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, Default, Deserialize)]
    #[serde(default)]
    #[allow(dead_code)]
    struct Probe {
        layers: usize,
        name: String,
    }

    #[test]
    fn names_the_bad_key() {
        match parse::<Probe>(r#"{"name": "x", "layers": "three"}"#) {
            Err(Error::Config { field, .. }) => assert_eq!(field, "layers"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn syntax_and_shape_errors() {
        assert!(matches!(parse::<Probe>("{"), Err(Error::Invalid { .. })));
        assert!(matches!(parse::<Probe>("[1]"), Err(Error::Invalid { .. })));
        let missing = Path::new("/nonexistent/dir/config.json");
        match read::<Probe>(missing) {
            Err(Error::File { path, .. }) => assert!(path.contains("config.json")),
            other => panic!("{other:?}"),
        }
    }
}
