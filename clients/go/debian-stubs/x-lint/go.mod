module golang.org/x/lint
