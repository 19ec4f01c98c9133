use ambit_integration::Cluster;
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hold() {
    let cluster = Cluster::builder().node("node1").node("node2").ambient_namespace("shop")
        .pod("node1", "shop", "client").pod("node2", "shop", "server").start().await;
    let _s = cluster.in_pod("server").echo(8080).await;
    eprintln!("READY {} {} {}", cluster.pod("server").netns, cluster.pod("server").ip, cluster.pod("client").ip);
    tokio::time::sleep(std::time::Duration::from_secs(60)).await;
}
