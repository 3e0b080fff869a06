// Command etcd is upstream etcd's own entry point, built from the published server module
// because the project's release binaries cannot be downloaded here.
package main

import (
	"os"

	"go.etcd.io/etcd/server/v3/etcdmain"
)

func main() {
	etcdmain.Main(os.Args)
}
