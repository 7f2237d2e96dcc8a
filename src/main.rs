fn main() {
    println!("outbox-relay");
}
