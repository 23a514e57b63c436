//go:build tools

// Package tools pins the commands hack/sealed-secrets.sh builds from this module.
package tools

import (
	_ "github.com/bitnami/sealed-secrets/cmd/controller"
	_ "github.com/bitnami/sealed-secrets/cmd/kubeseal"
)
