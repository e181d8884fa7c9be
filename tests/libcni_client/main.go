// A libcni client for corral's tests and benchmark: the code path containerd,
// CRI-O and podman use (conflist loading, plugin exec, result cache, prevResult
// on CHECK/DEL).
//
//	client add|check|del CONFDIR NETNAME CID NETNS IFNAME CACHEDIR
//	client bench CONFDIR NETNAME CACHEDIR NETNS... (one ADD/DEL pair per netns)
//
// Env: CNI_PATH (plugin dirs, ':'-separated), CNI_ARGS_KV ("K=V;K=V"),
// CAP_ARGS (JSON object of capability args, e.g. portMappings).
// Errors: the plugin's JSON error object on stdout, exit 1.
package main

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os"
	"strings"
	"time"

	"github.com/containernetworking/cni/libcni"
	"github.com/containernetworking/cni/pkg/types"
)

func fail(err error) {
	var e *types.Error
	if errors.As(err, &e) {
		b, _ := json.Marshal(e)
		fmt.Println(string(b))
	} else {
		b, _ := json.Marshal(map[string]interface{}{"code": 0, "msg": err.Error()})
		fmt.Println(string(b))
	}
	os.Exit(1)
}

func runtimeConf(cid, netns, ifname, cache string) *libcni.RuntimeConf {
	rt := &libcni.RuntimeConf{ContainerID: cid, NetNS: netns, IfName: ifname, CacheDir: cache}
	if kv := os.Getenv("CNI_ARGS_KV"); kv != "" {
		for _, pair := range strings.Split(kv, ";") {
			p := strings.SplitN(pair, "=", 2)
			if len(p) == 2 {
				rt.Args = append(rt.Args, [2]string{p[0], p[1]})
			}
		}
	}
	if ca := os.Getenv("CAP_ARGS"); ca != "" {
		rt.CapabilityArgs = map[string]interface{}{}
		if err := json.Unmarshal([]byte(ca), &rt.CapabilityArgs); err != nil {
			fail(err)
		}
	}
	return rt
}

func main() {
	if len(os.Args) < 4 {
		fmt.Fprintln(os.Stderr, "usage: client add|check|del|bench CONFDIR NETNAME ...")
		os.Exit(2)
	}
	cmd, confDir, netName := os.Args[1], os.Args[2], os.Args[3]
	list, err := libcni.LoadConfList(confDir, netName)
	if err != nil {
		fail(err)
	}
	cni := libcni.NewCNIConfig(strings.Split(os.Getenv("CNI_PATH"), ":"), nil)
	ctx := context.Background()
	if cmd == "bench" {
		cache := os.Args[4]
		var adds, dels []float64
		for i, ns := range os.Args[5:] {
			rt := runtimeConf(fmt.Sprintf("bench%d", i), ns, "eth0", cache)
			t := time.Now()
			if _, err := cni.AddNetworkList(ctx, list, rt); err != nil {
				fail(err)
			}
			adds = append(adds, float64(time.Since(t).Microseconds())/1000)
			t = time.Now()
			if err := cni.DelNetworkList(ctx, list, rt); err != nil {
				fail(err)
			}
			dels = append(dels, float64(time.Since(t).Microseconds())/1000)
		}
		b, _ := json.Marshal(map[string][]float64{"add": adds, "del": dels})
		fmt.Println(string(b))
		return
	}
	if len(os.Args) < 8 {
		fmt.Fprintln(os.Stderr, "usage: client add|check|del CONFDIR NETNAME CID NETNS IFNAME CACHEDIR")
		os.Exit(2)
	}
	rt := runtimeConf(os.Args[4], os.Args[5], os.Args[6], os.Args[7])
	switch cmd {
	case "add":
		res, err := cni.AddNetworkList(ctx, list, rt)
		if err != nil {
			fail(err)
		}
		b, _ := json.Marshal(res)
		fmt.Println(string(b))
	case "check":
		if err := cni.CheckNetworkList(ctx, list, rt); err != nil {
			fail(err)
		}
	case "del":
		if err := cni.DelNetworkList(ctx, list, rt); err != nil {
			fail(err)
		}
	default:
		fmt.Fprintln(os.Stderr, "unknown command", cmd)
		os.Exit(2)
	}
}
