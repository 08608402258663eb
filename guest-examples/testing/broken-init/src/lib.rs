//! `broken-init`: a version whose `init` refuses to start.

use covey_guest::Script;

struct Broken;

impl Script for Broken {
    fn init() -> Result<Self, String> {
        Err("this version refuses to start".into())
    }
}

covey_guest::export_script!(Broken);
