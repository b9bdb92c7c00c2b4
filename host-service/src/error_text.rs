//! Error messages a person can act on: an error followed by its causes. Some errors say almost
//! nothing at the top (tonic's "transport error") and others repeat their source's text, so the
//! chain is written out with each cause once.

/// `first` followed by `: cause` for each of `causes` whose text it does not hold yet.
pub fn with_causes<'a>(
    first: String,
    causes: impl Iterator<Item = &'a dyn std::error::Error>,
) -> String {
    let mut out = first;
    for cause in causes {
        let text = cause.to_string();
        if !out.contains(&text) {
            out.push_str(": ");
            out.push_str(&text);
        }
    }
    out
}

/// The causes below `err`, nearest first.
pub fn sources(err: &dyn std::error::Error) -> impl Iterator<Item = &dyn std::error::Error> {
    std::iter::successors(err.source(), |e| e.source())
}

/// `err` and all its causes ([`with_causes`]).
pub fn full(err: &dyn std::error::Error) -> String {
    with_causes(err.to_string(), sources(err))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(Debug, thiserror::Error)]
    #[error("outer")]
    struct Outer(#[source] Middle);

    #[derive(Debug, thiserror::Error)]
    #[error("middle: inner")]
    struct Middle(#[source] std::io::Error);

    #[test]
    fn each_cause_is_said_once() {
        let err = Outer(Middle(std::io::Error::other("inner")));
        assert_eq!(full(&err), "outer: middle: inner");
    }
}
