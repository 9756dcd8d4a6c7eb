//! Arbitrary text as a migration source or destination DSN: the parsers never panic, and what
//! they accept has the shape they promise (a non-empty path; a postgres URL).
#![no_main]

use broker_dispatch::migrate::{parse_destination, parse_source};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(path) = parse_source(text) {
        assert!(
            !path.as_os_str().is_empty(),
            "accepted {text:?} as an empty path"
        );
    }
    if let Ok(url) = parse_destination(text) {
        assert!(
            url.starts_with("postgres://") || url.starts_with("postgresql://"),
            "accepted {text:?} as a destination"
        );
    }
});
