//! Serde for the enum fields of the protobuf messages (stored as `i32`):
//! written as the value's name without its prefix (`"FRESH"` for
//! `FRESHNESS_FRESH`), read from such a name, the full name, or a number.

macro_rules! enum_field {
    ($module:ident, $ty:ty, $prefix:literal) => {
        #[doc = concat!("Serde for an `i32` field holding a [`", stringify!($ty), "`].")]
        pub mod $module {
            /// Writes the value's name without its prefix; an unknown value as its number.
            pub fn serialize<S: serde::Serializer>(value: &i32, s: S) -> Result<S::Ok, S::Error> {
                match <$ty>::try_from(*value) {
                    Ok(v) => s.serialize_str(v.as_str_name().trim_start_matches($prefix)),
                    Err(_) => s.serialize_i32(*value),
                }
            }

            /// Reads a name (with or without the prefix) or a number.
            pub fn deserialize<'de, D: serde::Deserializer<'de>>(d: D) -> Result<i32, D::Error> {
                #[derive(serde::Deserialize)]
                #[serde(untagged)]
                enum Raw {
                    Number(i32),
                    Name(String),
                }
                match <Raw as serde::Deserialize>::deserialize(d)? {
                    Raw::Number(n) => Ok(n),
                    Raw::Name(name) => {
                        let full = if name.starts_with($prefix) {
                            name.clone()
                        } else {
                            format!("{}{}", $prefix, name)
                        };
                        <$ty>::from_str_name(&full)
                            .map(|v| v as i32)
                            .ok_or_else(|| {
                                serde::de::Error::custom(format!(
                                    "{name:?} is not a value of {}",
                                    stringify!($ty)
                                ))
                            })
                    }
                }
            }
        }
    };
}

enum_field!(freshness, crate::pb::Freshness, "FRESHNESS_");
enum_field!(decision, crate::pb::Decision, "DECISION_");
enum_field!(reset_reason, crate::pb::ResetReason, "RESET_REASON_");
enum_field!(resume_outcome, crate::pb::ResumeOutcome, "RESUME_OUTCOME_");

#[cfg(test)]
mod tests {
    use crate::pb;

    #[test]
    fn enum_fields_are_written_and_read_by_name_without_prefix() {
        let response = pb::CheckResponse {
            freshness: pb::Freshness::Stale as i32,
            decision: pb::Decision::Revalidate as i32,
            ..Default::default()
        };
        let json = serde_json::to_value(response).unwrap();
        assert_eq!(json["freshness"], "STALE");
        assert_eq!(json["decision"], "REVALIDATE");
        let back: pb::CheckResponse = serde_json::from_value(json).unwrap();
        assert_eq!(back, response);
        let full: pb::Reset =
            serde_json::from_value(serde_json::json!({"reason": "RESET_REASON_NEW_EPOCH"}))
                .unwrap();
        assert_eq!(full.reason(), pb::ResetReason::NewEpoch);
        let number: pb::Reset = serde_json::from_value(serde_json::json!({"reason": 1})).unwrap();
        assert_eq!(number.reason(), pb::ResetReason::HistoryCompacted);
        assert!(
            serde_json::from_value::<pb::Reset>(serde_json::json!({"reason": "NOPE"})).is_err()
        );
    }

    #[test]
    fn messages_read_with_defaults_for_missing_fields() {
        let fill: pb::FillRequest =
            serde_json::from_value(serde_json::json!({"key": "k", "dependencies": ["d"]})).unwrap();
        assert_eq!(fill, pb::FillRequest::new("k", ["d"]));
        let change = serde_json::to_value(pb::Change::new("k")).unwrap();
        assert!(
            change.get("external_version").is_none(),
            "unset optionals are left out"
        );
    }
}
