// An ESP8266 on Wi-Fi as device `esp-1`: emits `button` when the flash
// button is pressed, blinks its LED on the command `blink`, answers the
// call `read` with the analog input. Register it first on any node:
//   covey device add esp-1
// and start that node with `bridge_udp: 0.0.0.0:7468`.
#include <ESP8266WiFi.h>
#include <WiFiUdp.h>
#include <covey_device.h>

static const char *WIFI_SSID = "your-ssid";
static const char *WIFI_PASS = "your-password";
static const IPAddress BRIDGE(192, 168, 1, 10); // the node running covey
static const uint16_t BRIDGE_PORT = 7468;
#define DEVICE_NAME "esp-1"
#define DEVICE_KEY "paste the 64 hex digits printed by covey device add"

static WiFiUDP udp;
static covey_device dev;

static int udp_write(void *, const uint8_t *buf, size_t len) {
  udp.beginPacket(BRIDGE, BRIDGE_PORT);
  udp.write(buf, len);
  return udp.endPacket() ? 0 : -1;
}

static int udp_read(void *, uint8_t *buf, size_t cap) {
  int n = udp.parsePacket();
  return n > 0 ? udp.read(buf, cap) : 0;
}

static uint32_t now_ms(void *) { return millis(); }

static void hw_random(void *, uint8_t *buf, size_t len) {
  for (size_t i = 0; i < len; i++) buf[i] = (uint8_t)RANDOM_REG32; // hardware RNG
}

static void on_command(void *, const char *from, const char *name, const uint8_t *, size_t) {
  if (strcmp(name, "blink") == 0) digitalWrite(LED_BUILTIN, !digitalRead(LED_BUILTIN));
}

static int on_call(void *, const char *, const char *name, const uint8_t *, size_t,
                   uint8_t *reply, size_t cap) {
  if (strcmp(name, "read") == 0) return snprintf((char *)reply, cap, "%d", analogRead(A0));
  snprintf((char *)reply, cap, "unknown call %s", name);
  return -1;
}

void setup() {
  pinMode(LED_BUILTIN, OUTPUT);
  pinMode(0, INPUT_PULLUP); // the flash button
  WiFi.begin(WIFI_SSID, WIFI_PASS);
  while (WiFi.status() != WL_CONNECTED) delay(100);
  udp.begin(BRIDGE_PORT);
  uint8_t key[COVEY_KEY_LEN];
  covey_key_from_hex(key, DEVICE_KEY);
  covey_transport t = {udp_write, udp_read, now_ms, hw_random, nullptr, 0};
  covey_init(&dev, &t, DEVICE_NAME, key);
  covey_on_command(&dev, on_command);
  covey_on_call(&dev, on_call);
}

void loop() {
  static int last = HIGH;
  covey_poll(&dev);
  int b = digitalRead(0);
  if (b == LOW && last == HIGH) covey_emit(&dev, "button", (const uint8_t *)"pressed", 7, 1);
  last = b;
  delay(1); // lets the Wi-Fi stack run
}
