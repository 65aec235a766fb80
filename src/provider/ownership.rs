//! Who owns a backend resource, decided the same way for every backend. The record
//! `<namespace>/<name>/<uid>` lives where the resource lives (an AWS thing attribute, an IoT
//! Hub twin tag); a resource without a record is this Thing's only when the backend can prove it
//! (its status recorded the resource, or the resource holds this Thing's own credential), or
//! when the operator's configuration allows adopting unowned resources. The uid makes a Thing
//! deleted and created again under the same name a new owner. Pure.

/// The owner record of a Thing.
pub fn owner_record(namespace: &str, name: &str, uid: &str) -> String {
    format!("{namespace}/{name}/{uid}")
}

/// What the operator may do with an existing resource.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Claim {
    /// It carries this Thing's record.
    Ours,
    /// No record, but proven this Thing's, or adopting is allowed: the record is to be added.
    Adopt,
    /// Not this Thing's: leave it alone. The reason, for the condition message (never the other
    /// owner's details).
    Refuse(&'static str),
}

/// The reason given for a resource recorded as another Thing's.
pub const OTHER_OWNER: &str = "belongs to another Thing";

/// The rule: `found` is the record the resource carries, `ours` this Thing's, `proven` whether
/// the backend proved the unrecorded resource this Thing's, `unowned` the reason given for an
/// unrecorded one (naming the backend's adopt switch).
pub fn claim(
    found: Option<&str>,
    ours: &str,
    proven: bool,
    adopt_unowned: bool,
    unowned: &'static str,
) -> Claim {
    match found {
        Some(record) if record == ours => Claim::Ours,
        Some(_) => Claim::Refuse(OTHER_OWNER),
        None if proven || adopt_unowned => Claim::Adopt,
        None => Claim::Refuse(unowned),
    }
}
