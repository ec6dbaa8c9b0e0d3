module golang.org/x/oauth2
