use super::*;

pub(crate) const EXAMPLE: &str = r#"
[cluster]
name = "web"
secret = "s3cr3t-shared-key"
state-dir = "/tmp/tandem-state"
run-dir = "/tmp/tandem-run"

[[node]]
name = "node1"
id = 1
address = "10.99.0.1"

[[node]]
name = "node2"
id = 2
address = "10.99.0.2"
replication-port = 7800

[[resource]]
name = "www"
protocol = "C"
allow-two-primaries = true
size = "64MiB"

[resource.on.node1]
disk = "/tmp/n1.img"

[resource.on.node2]
disk = "/tmp/n2.img"
meta-disk = "/tmp/n2.meta"
"#;

#[test]
fn parses_full_example() {
    let c = ClusterConfig::parse(EXAMPLE).unwrap();
    assert_eq!(c.nodes.len(), 2);
    assert_eq!(c.nodes[0].replication_port, DEFAULT_REPLICATION_PORT);
    assert_eq!(c.nodes[1].replication_port, 7800);
    let r = c.resource("www").unwrap();
    assert_eq!(r.size_bytes(), Some(64 << 20));
    assert_eq!(
        c.disk_for(r, "node1").unwrap(),
        PathBuf::from("/tmp/n1.img")
    );
    assert_eq!(c.external_meta_for(r, "node1"), None);
    assert_eq!(
        c.external_meta_for(r, "node2"),
        Some(PathBuf::from("/tmp/n2.meta"))
    );
    assert_eq!(c.resource_node_names(r), vec!["node1", "node2"]);
    assert_eq!(
        c.nbd_socket("node2", "www"),
        PathBuf::from("/tmp/tandem-run/node2/nbd-www.sock")
    );
}

fn err_of(text: &str) -> String {
    ClusterConfig::parse(text).unwrap_err().to_string()
}

#[test]
fn errors_name_the_key() {
    let e = err_of(&EXAMPLE.replace("protocol = \"C\"", "protocol = \"D\""));
    assert!(e.contains("protocol"), "{e}");
    let e = err_of(&EXAMPLE.replace("protocol = \"C\"", "protocol = \"B\""));
    assert!(e.contains("resource.www.allow-two-primaries"), "{e}");
    let e = err_of(&EXAMPLE.replace("id = 2", "id = 1"));
    assert!(e.contains("node.node2.id"), "{e}");
    let e = err_of(&EXAMPLE.replace("size = \"64MiB\"", "size = \"12Q\""));
    assert!(e.contains("resource.www.size"), "{e}");
    let e = err_of(&EXAMPLE.replace("secret = \"s3cr3t-shared-key\"", "secret = \"x\""));
    assert!(e.contains("cluster.secret"), "{e}");
    let e = err_of(&EXAMPLE.replace("address = \"10.99.0.2\"", "address = \"nope\""));
    assert!(e.contains("address"), "{e}");
    let e = err_of(&EXAMPLE.replace("[resource.on.node2]", "[resource.on.node9]"));
    assert!(e.contains("resource.www.on.node9"), "{e}");
    let e = err_of(&EXAMPLE.replace("allow-two-primaries", "allow-three-primaries"));
    assert!(e.contains("allow-three-primaries"), "{e}");
}

#[test]
fn unknown_node_lists_known() {
    let c = ClusterConfig::parse(EXAMPLE).unwrap();
    let e = c.node("node7").unwrap_err().to_string();
    assert!(e.contains("node1, node2"), "{e}");
}

#[test]
fn quorum_values() {
    let c = ClusterConfig::parse(&EXAMPLE.replace(
        "size = \"64MiB\"",
        "size = \"64MiB\"\nquorum = \"majority\"\non-no-quorum = \"suspend-io\"",
    ))
    .unwrap();
    let r = c.resource("www").unwrap();
    assert_eq!(r.quorum_policy().unwrap(), Quorum::Majority);
    assert_eq!(r.on_no_quorum, OnNoQuorum::SuspendIo);
    let c =
        ClusterConfig::parse(&EXAMPLE.replace("size = \"64MiB\"", "size = \"64MiB\"\nquorum = 2"))
            .unwrap();
    assert_eq!(
        c.resource("www").unwrap().quorum_policy().unwrap(),
        Quorum::Nodes(2)
    );
    let e = err_of(&EXAMPLE.replace("size = \"64MiB\"", "size = \"64MiB\"\nquorum = \"most\""));
    assert!(e.contains("resource.www.quorum"), "{e}");
    let e = err_of(&EXAMPLE.replace("size = \"64MiB\"", "size = \"64MiB\"\nquorum = 3"));
    assert!(e.contains("resource.www.quorum"), "{e}");
}

#[test]
fn diskless_tiebreaker_members() {
    // A third node without a disk, listed by name: a diskless tiebreaker, even a witness.
    let with_witness = EXAMPLE
        .replace(
            "[[resource]]",
            "[[node]]\nname = \"tb\"\nid = 3\naddress = \"10.99.0.3\"\nwitness = true\n\n[[resource]]",
        )
        .replace(
            "size = \"64MiB\"",
            "size = \"64MiB\"\nnodes = [\"node1\", \"node2\", \"tb\"]\nquorum = \"majority\"",
        );
    let c = ClusterConfig::parse(&with_witness).unwrap();
    let r = c.resource("www").unwrap();
    assert_eq!(c.resource_node_names(r), vec!["node1", "node2", "tb"]);
    assert!(c.is_diskless(r, "tb"));
    assert!(!c.is_diskless(r, "node1"));
    // A witness with a disk is refused, naming the key.
    let e = err_of(&format!(
        "{with_witness}\n[resource.on.tb]\ndisk = \"/tmp/tb.img\"\n"
    ));
    assert!(e.contains("resource.www.on.tb.disk"), "{e}");
    // meta-disk without a disk means nothing.
    let e = err_of(&format!(
        "{with_witness}\n[resource.on.tb]\nmeta-disk = \"/tmp/tb.meta\"\n"
    ));
    assert!(e.contains("resource.www.on.tb.meta-disk"), "{e}");
    // Somebody must hold the data.
    let none = EXAMPLE
        .replace("[resource.on.node1]\ndisk = \"/tmp/n1.img\"\n", "")
        .replace(
            "[resource.on.node2]\ndisk = \"/tmp/n2.img\"\nmeta-disk = \"/tmp/n2.meta\"\n",
            "",
        );
    let e = err_of(&none);
    assert!(e.contains("resource.www.on"), "{e}");
}
