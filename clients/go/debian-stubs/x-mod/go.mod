module golang.org/x/mod
