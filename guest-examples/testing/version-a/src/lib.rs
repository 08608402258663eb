const VERSION: &str = "a";
include!("../../versioned.rs");
