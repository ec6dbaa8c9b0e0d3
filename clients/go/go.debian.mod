// Build file for machines without the Go module proxy: the same module, with
// every dependency taken from Debian's packaged sources (golang-google-grpc-dev
// 1.33.3, golang-google-protobuf-dev 1.28.1, ...). Used as
//   go build -mod=readonly -modfile=go.debian.mod ./...
// Members of the module graph that this client never compiles are replaced by
// empty stand-ins in debian-stubs/ (a go.mod line each), since Go must read
// every go.mod of the graph but nothing else of them.
module github.com/qwen-grpc/qwen-grpc/clients/go

go 1.19

require (
	google.golang.org/grpc v1.33.3
	google.golang.org/protobuf v1.28.1
)

require (
	github.com/golang/protobuf v1.5.0 // indirect
	golang.org/x/net v0.0.0-20190311183353-d8887717615a // indirect
	golang.org/x/sys v0.5.0 // indirect
	golang.org/x/text v0.7.0 // indirect
	google.golang.org/genproto v0.0.0-20200526211855-cb27e3aa2013 // indirect
)

// Debian's packaged sources.
replace google.golang.org/grpc => /usr/share/gocode/src/google.golang.org/grpc

replace google.golang.org/protobuf => /usr/share/gocode/src/google.golang.org/protobuf

replace google.golang.org/genproto => /usr/share/gocode/src/google.golang.org/genproto

replace github.com/golang/protobuf => /usr/share/gocode/src/github.com/golang/protobuf

replace github.com/google/go-cmp => /usr/share/gocode/src/github.com/google/go-cmp

replace golang.org/x/net => /usr/share/gocode/src/golang.org/x/net

replace golang.org/x/sys => /usr/share/gocode/src/golang.org/x/sys

replace golang.org/x/text => /usr/share/gocode/src/golang.org/x/text

// Never compiled here: empty stand-ins.
replace github.com/cncf/udpa/go => ./debian-stubs/cncf-udpa-go

replace github.com/envoyproxy/go-control-plane => ./debian-stubs/envoyproxy-go-control-plane

replace github.com/golang/glog => ./debian-stubs/golang-glog

replace github.com/google/uuid => ./debian-stubs/google-uuid

replace golang.org/x/oauth2 => ./debian-stubs/x-oauth2

replace golang.org/x/term => ./debian-stubs/x-term

replace golang.org/x/tools => ./debian-stubs/x-tools

replace golang.org/x/mod => ./debian-stubs/x-mod

replace golang.org/x/lint => ./debian-stubs/x-lint

replace honnef.co/go/tools => ./debian-stubs/honnef-go-tools
