fn main() {
    println!("I am not a Covey script");
}
